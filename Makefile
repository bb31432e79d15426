# Two entry points, both from a fresh clone: `make demo` and `make test`.
# Everything installs into .venv from this repo's own pyproject.toml.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
RUN    ?= runs/demo
OUT    ?= out/demo

.PHONY: setup demo live test test-slow audio-tools clean-demo

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

setup: $(VENV)/.installed

# FluidSynth + a small GM soundfont for the demo's WAV files. Best effort: without them
# (no root, no apt) the demo still writes MIDI, piano rolls and the gallery.
audio-tools:
	@command -v fluidsynth >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq fluidsynth timgm6mb-soundfont >/dev/null) \
	      || echo "note: could not install fluidsynth; the demo will skip audio"; \
	  else echo "note: fluidsynth not found (apt-get install fluidsynth timgm6mb-soundfont); the demo will skip audio"; fi; }

demo: setup audio-tools
	$(PY) -m data_prep.build --demo --output_dir=data/music21_demo
	$(PY) -m mgpt.train --config=configs/small.py --workdir=$(RUN)
	$(PY) -m mgpt.generate --workdir=$(RUN) --output_dir=$(OUT) --style=all --num_samples=8 \
	  $$(command -v fluidsynth >/dev/null 2>&1 && echo --audio)
	@echo "Open $(OUT)/index.html in a browser to hear and see the pieces."

# Play with the demo model in the browser (after `make demo`): prints the address to open.
live: setup
	$(PY) -m mgpt.live --workdir=$(RUN)

# The suite, under 10 minutes on 2 cores: two pytest workers, each file's tests (and fixtures) on
# one of them. `make test-slow` runs the tests marked slow (multi-process, multi-device, fault-loop
# and large-config runs: about as long again), one at a time; CI runs both.
test: setup
	$(PY) -m pytest -q -n 2 --dist loadfile -m "not slow"

test-slow: setup
	$(PY) -m pytest -q -m slow

clean-demo:
	rm -rf $(RUN) $(OUT)
