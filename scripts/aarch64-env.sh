# Sourced by scripts/build-aarch64.sh and scripts/test-aarch64.sh: the environment of the
# aarch64 cross build. Both must see the same values, or cargo rebuilds what depends on them.
# ARM_ARCH (default armv8.2-a+dotprod+fp16: Orin's Cortex-A78AE; armv8-a for any 64-bit Arm).
ARM_ARCH=${ARM_ARCH:-armv8.2-a+dotprod+fp16}
# C and C++ (llama.cpp through the cmake crate, ring, …) for the target; llama.cpp gets the
# Arm architecture explicitly (its GGML_NATIVE is off in a cross build).
export CC_aarch64_unknown_linux_gnu=aarch64-linux-gnu-gcc
export CXX_aarch64_unknown_linux_gnu=aarch64-linux-gnu-g++
export AR_aarch64_unknown_linux_gnu=aarch64-linux-gnu-ar
export CFLAGS_aarch64_unknown_linux_gnu="-march=$ARM_ARCH"
export CXXFLAGS_aarch64_unknown_linux_gnu="-march=$ARM_ARCH"
# bindgen (llama.cpp's and V4L2's headers) parses with clang for the target's sysroot.
export BINDGEN_EXTRA_CLANG_ARGS_aarch64_unknown_linux_gnu="--target=aarch64-unknown-linux-gnu --sysroot=/usr/aarch64-linux-gnu -I/usr/aarch64-linux-gnu/include"
export PKG_CONFIG_ALLOW_CROSS=1
