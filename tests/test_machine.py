from quillan.machine import cpu_generation, cpu_info, cpuinfo_fields

ZEN5 = """processor\t: 0
vendor_id\t: AuthenticAMD
cpu family\t: 26
model\t\t: 2
model name\t: AMD EPYC
flags\t\t: fpu avx2 avx512_vnni

processor\t: 1
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 143
flags\t\t: fpu sse2
"""


def test_cpu_generation_reads_the_first_processor_block():
    assert cpu_generation(ZEN5) == "AuthenticAMD family 26 model 2"


def test_cpu_generation_is_empty_when_a_field_is_missing():
    assert cpu_generation("processor\t: 0\nvendor_id\t: AuthenticAMD\nmodel\t\t: 2\n") == ""
    assert cpu_generation("") == ""


def test_cpu_info_records_the_generation_beside_the_model_name():
    info = cpu_info()
    assert set(info) == {"cpu", "cpu_generation", "cores", "isa"}
    assert info["cpu_generation"] == cpu_generation()


def test_cpuinfo_fields_keep_the_first_processors_values():
    fields = cpuinfo_fields(ZEN5)
    assert fields["model name"] == "AMD EPYC"
    assert fields["flags"].split() == ["fpu", "avx2", "avx512_vnni"]
    assert fields["cpu family"] == "26"
