# C++/CUDA sources of the extension `fastrlhf._C`, shipped as package data of `fastrlhf.csrc`
# so that the extension can be built on first use from an installed wheel.
