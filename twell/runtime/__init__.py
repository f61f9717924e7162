"""What the kernel launchers run on: the NVRTC loader (:mod:`.loader`), launch helpers and the driver-API
launch (:mod:`.launch`), and the one cuBLAS binding (:mod:`.blas`).  Importing it needs no GPU and does
not import CuPy."""
