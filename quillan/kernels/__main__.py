"""`python -m quillan.kernels`: build the native kernels now (what `make install` runs)."""

from quillan.kernels import build, library, path as kernel_path, unavailable_reason

path = build()
lib = library()
if lib is None:
    raise SystemExit(f"quillan kernels: built {path} but cannot load it: {unavailable_reason()}")
print(f"quillan kernels: {path} (instruction path: {kernel_path()})")
