# Thin wrapper over CMake presets. `make test` and `make demo` work on a fresh Debian machine.
JOBS ?= $(shell nproc)

.PHONY: deps build test demo clean format

deps:
	./scripts/install-deps.sh

build:
	cmake --preset release
	cmake --build --preset release -j $(JOBS)

test: deps build
	ctest --preset release -j $(JOBS)

demo: deps build
	./scripts/demo.sh

format:
	clang-format -i $$(git ls-files '*.h' '*.cpp' '*.cu' '*.cuh')

clean:
	rm -rf build build-debug build-cpu
