PYTHON ?= python3
TOY_DIR ?= toy

.PHONY: toy-training smoke_training smoke_toy smoke_torch test bench

# Build the toy artifacts and distill the toy student afresh (offline, CPU, seconds).
toy-training:
	rm -rf runs/toy
	$(PYTHON) -m kdtrain make-toy --out-dir $(TOY_DIR)
	$(PYTHON) -m kdtrain train configs/toy.yaml

# The human-readable end-to-end report, then the smoke test suite.
smoke_training:
	$(PYTHON) -m kdtrain smoke
	$(PYTHON) -m pytest -m smoke -p no:cacheprovider

# The conversion toys: the toy block (a one-block Llama) exported to ONNX and Core ML, probed
# against PyTorch layer by layer; the tiny torch model to ONNX and Core ML. Built by the same
# make_conversion_toys that `kdtrain make-toy` runs.
smoke_toy:
	$(PYTHON) -m pytest -p no:cacheprovider tests/test_export.py -k "toy_block or toy_onnx or conversion_toys"

smoke_torch:
	$(PYTHON) -m pytest -p no:cacheprovider tests/test_export.py -k toy_torch

test:
	$(PYTHON) -m pytest -n 2 -p no:cacheprovider

bench:
	$(PYTHON) bench/smoke_time.py
	$(PYTHON) bench/toy_train_time.py
