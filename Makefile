# The README's two commands. Each one does its own set-up on a machine that has only Python:
# a .venv, torch first and pinned (or, on a machine whose python3 already has CUDA torch, that
# torch), then triton, the package and its C++ extension.
PYTHON3 ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
TORCH_CPU := torch==2.13.0
TRITON_CPU := triton==3.7.1

.PHONY: test demo clean

test: $(STAMP)
	$(PY) -m pytest -q tests benchmarks/test_bench_loss.py --benchmark-disable

demo: $(STAMP)
	$(PY) examples/spin_vs_sft/demo.py --out runs/demo

$(STAMP): setup.py pyproject.toml $(wildcard csrc/*.cpp)
	@if $(PYTHON3) -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then \
		echo "using the CUDA torch of $(PYTHON3)"; \
		$(PYTHON3) -m venv --system-site-packages $(VENV); \
	else \
		$(PYTHON3) -m venv $(VENV) && \
		$(PY) -m pip install -q --upgrade pip && \
		$(PY) -m pip install -q $(TORCH_CPU) && \
		$(PY) -m pip install -q $(TRITON_CPU) numpy; \
	fi
	$(PY) -m pip install -q setuptools wheel ninja
	$(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

clean:
	rm -rf $(VENV) build *.egg-info spin_kernels/*.so
