PYTHON ?= python3
TOY_DIR ?= toy

.PHONY: toy-training smoke_training test bench

# Build the toy artifacts and distill the toy student afresh (offline, CPU, seconds).
toy-training:
	rm -rf runs/toy
	$(PYTHON) -m kdtrain make-toy --out-dir $(TOY_DIR)
	$(PYTHON) -m kdtrain train configs/toy.yaml

# The human-readable end-to-end report, then the smoke test suite.
smoke_training:
	$(PYTHON) -m kdtrain smoke
	$(PYTHON) -m pytest -m smoke -p no:cacheprovider

test:
	$(PYTHON) -m pytest -n 2 -p no:cacheprovider

bench:
	$(PYTHON) bench/smoke_time.py
	$(PYTHON) bench/toy_train_time.py
