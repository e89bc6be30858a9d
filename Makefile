# dm-shared-snap top-level Makefile.
#   make            build dm-shared-snap.ko against the cached test kernel (built if missing)
#   make tools      build the userspace tools (shsnap) with cargo
#   make test       run every test (userspace and VM), as .ci/run does
#   make demo       the snapshot demo in a VM
#   make bench      the throughput benchmark in a VM
#   make clean
# `make -C $KDIR M=$PWD` works too (Kbuild holds the module's objects).

KDIR ?= $(shell scripts/build-kernel)
RUSTC ?= /usr/bin/rustc
BINDGEN ?= $(HOME)/.cargo/bin/bindgen

all: module

# .kdir remembers which kernel tree the objects were built for: switching between the debug
# (test) and bench kernels rebuilds from clean, since struct layouts differ between them.
module:
	@if [ "$$(cat .kdir 2>/dev/null)" != "$(KDIR)" ]; then \
		$(MAKE) -s -C $(KDIR) M=$(CURDIR) clean; echo "$(KDIR)" > .kdir; fi
	$(MAKE) -C $(KDIR) M=$(CURDIR) RUSTC=$(RUSTC) BINDGEN=$(BINDGEN) HOSTRUSTC=$(RUSTC) modules

tools:
	cargo build --release

test:
	scripts/test-all

demo:
	scripts/demo

bench:
	scripts/bench

clean:
	-$(MAKE) -C $(KDIR) M=$(CURDIR) clean
	rm -f .kdir
	cargo clean

.PHONY: all module tools test demo bench clean
