"""``agent train`` and ``agent data``: train a persona's adapter and build its data."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click

from hyperlex.cli.common import (
    emit_json,
    engine_options,
    get_host,
    guidance_option,
    size_text,
)
from hyperlex.errors import HyperlexError


@click.command()
@click.argument("bundle", type=click.Path(file_okay=False, path_type=Path))
@click.option("--r", "r", type=int, help="LoRA rank.")
@click.option("--alpha", type=int, help="LoRA alpha.")
@click.option("--dropout", type=float, help="LoRA dropout.")
@click.option("--target-modules", help="Comma-separated module names, e.g. q_proj,v_proj.")
@click.option("--lr", "learning_rate", type=float, help="Learning rate.")
@click.option("--epochs", type=int)
@click.option("--batch-size", type=int)
@click.option("--max-length", type=int, help="Tokens per exchange (longer ones are cut).")
@click.option("--seed", type=int)
@click.option("--save-dtype", type=click.Choice(["float32", "bfloat16", "float16"]),
              help="Dtype the adapter weights are stored in.")
@click.option("--data", help="Training set, relative to the bundle.")
@click.option("--heldout", help="Held-out set, relative to the bundle.")
@click.option("--extra-data", multiple=True, callback=lambda _c, _p, value: value or None,
              help="Another training set mixed in, relative to the bundle (repeatable), e.g. "
              "data/faithful.jsonl from agent data faithful.")
@click.option("--init-adapter", default=None, metavar="DIR",
              help="Start from this adapter's weights (relative to the bundle, e.g. adapter/): "
              "a further round instead of a fresh LoRA.")
@click.option("--anchor-adapter", default=None, metavar="DIR",
              help="Hold the round near this adapter (relative to the bundle, e.g. adapter/): "
              "the loss adds the KL divergence from its next-token distribution at every "
              "reply position (docs/data.md#anchoring-a-further-round---anchor-adapter).")
@click.option("--anchor-weight", type=float, default=None,
              help="Weight of the anchor's KL beside the cross-entropy (default: 1).")
@click.option("--unanchored-data", multiple=True, callback=lambda _c, _p, value: value or None,
              metavar="FILE",
              help="A training file (--data or --extra-data) whose records the anchor does not "
                   "hold: the round's new data, learnt freely (repeatable).")
@click.option("--qlora/--no-qlora", default=None,
              help="QLoRA: 4-bit NF4 base through bitsandbytes (default: from train.yaml).")
@click.option("--gradient-checkpointing/--no-gradient-checkpointing", default=None,
              help="Recompute activations during the backward pass: much less memory, about "
              "a third more time per step (default: from train.yaml; when it is off there, "
              "agent train turns it on only if that is what fits --max-memory).")
@click.option("--micro-batch-size", type=int, default=None,
              help="Rows per forward/backward pass, gradients accumulated up to --batch-size "
                   "(default: the most that fit --max-memory).")
@click.option("--loss-chunk", type=int, default=None,
              help="Reply tokens whose logits are computed at a time (default: as many as "
                   "fit 128 MiB).")
@click.option("--max-memory", default=None, metavar="SIZE",
              help="Memory the run may use, e.g. 3G: micro-batches and gradient "
                   "checkpointing are chosen to fit, or training is refused before it starts "
                   "(default: what the machine has available, less 1 GiB).")
@click.option("--base", default=None, metavar="MODEL", help="Base model (default: embedded).")
@click.option("--resume", is_flag=True, help="Continue from the checkpoint Ctrl-C saved.")
@click.option("--json", "as_json", is_flag=True, help="Print the training card as JSON.")
def train(bundle: Path, base: str | None, resume: bool, as_json: bool, max_memory: str | None,
          **options: Any) -> None:
    """Train the LoRA adapter of the persona bundle BUNDLE.

    Options come from BUNDLE/train.yaml, then these overrides. Ctrl-C saves a checkpoint;
    --resume continues from it.
    """
    from hyperlex.training.memory import parse_size
    from hyperlex.training.train import TrainingInterrupted, load_config
    from hyperlex.training.train import train as run_training

    config = load_config(bundle, options)
    budget = parse_size(max_memory) if max_memory is not None else None
    click.echo(f"Training {bundle} ({'QLoRA' if config.qlora else 'LoRA'} r={config.r} "
               f"alpha={config.alpha}, {config.epochs} epochs)", err=True)
    try:
        card = run_training(bundle, config, base=base, resume=resume, max_memory=budget)
    except TrainingInterrupted as exc:
        click.echo(str(exc), err=True)
        sys.exit(130)
    if as_json:
        emit_json(card)
        return
    click.echo(f"adapter written to {bundle / 'adapter'} ({size_text(card['adapter_bytes'])})")
    click.echo(f"loss {card['first_loss']:.3f} -> {card['final_loss']:.3f}"
               + (f", held-out {card['heldout_loss']:.3f}" if card["heldout_loss"] else "")
               + f"; {card['wall_seconds']:.0f} s, peak memory {card['peak_memory_mb']:.0f} MB")


@click.group()
def data() -> None:
    """Validate and build training data."""


@data.command("validate")
@click.argument("files", nargs=-1, required=True,
                type=click.Path(dir_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True)
def data_validate(files: tuple[Path, ...], as_json: bool) -> None:
    """Check JSONL datasets; every bad record is listed with its line number."""
    from hyperlex.training.data import DataError, read_dataset

    report, failed = [], False
    for file in files:
        try:
            report.append({"file": str(file), "records": len(read_dataset(file)), "problems": []})
        except DataError as exc:
            report.append({"file": str(file), "records": None, "problems": exc.problems})
            failed = True
        except HyperlexError as exc:
            report.append({"file": str(file), "records": None, "problems": [str(exc)]})
            failed = True
    if as_json:
        emit_json(report)
    else:
        for entry in report:
            if entry["problems"]:
                for line in entry["problems"]:
                    click.echo(line)
            else:
                click.echo(f"{entry['file']}: {entry['records']} records OK")
    if failed:
        sys.exit(1)


@data.command("distill")
@click.option("-p", "--persona", required=True, help="Persona whose contract prompts the teacher.")
@click.option("--prompts", "prompts_file", default=None,
              type=click.Path(dir_okay=False, path_type=Path),
              help="One prompt per line, or JSONL with human/prompt fields.")
@click.option("--fresh-prompts", type=click.IntRange(1), default=None, metavar="N",
              help="Instead of --prompts: N prompts the persona was never trained on, drawn "
                   "(--seed) from the other personas' training prompts, held-out ones left out.")
@click.option("--seed", default=0, show_default=True, help="Which --fresh-prompts.")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="JSONL to append to; existing prompts in it are skipped (resume).")
@click.option("--self", "self_replay", is_flag=True,
              help="The persona's own adapter answers, not the bare base: self-replay, which "
                   "holds a further training round to its current voice (docs/data.md).")
@click.option("--teacher-url", default=None,
              help="OpenAI-compatible base URL (e.g. http://127.0.0.1:8000/v1); default: the "
                   "local base model.")
@click.option("--teacher-model", default="gpt-4o-mini", show_default=True,
              help="Model name sent to --teacher-url.")
@click.option("--api-key-env", default="OPENAI_API_KEY", show_default=True,
              help="Environment variable holding the teacher's API key.")
@click.option("--batch-size", default=8, show_default=True, type=click.IntRange(1, 256))
@click.option("-o", "--option", "options", type=(str, str), multiple=True, metavar="KEY VALUE",
              help="Generation option for the teacher.")
@engine_options
def data_distill(persona: str, prompts_file: Path | None, fresh_prompts: int | None, seed: int,
                 out: Path, self_replay: bool, teacher_url: str | None, teacher_model: str,
                 api_key_env: str, batch_size: int, options: tuple[tuple[str, str], ...],
                 base: str | None, dtype: str, quantize: str | None) -> None:
    """Build a dataset by asking a teacher to answer prompts with PERSONA's full contract."""
    from tqdm import tqdm

    from hyperlex.generation import parse_options
    from hyperlex.training import distill as distilling

    if (prompts_file is None) == (fresh_prompts is None):
        raise click.UsageError("give exactly one of --prompts FILE and --fresh-prompts N")
    if self_replay and teacher_url:
        raise click.UsageError("--self answers with the local adapter; it takes no "
                               "--teacher-url")
    host = get_host()
    chosen = host.persona(persona)
    if self_replay and chosen.adapter_dir is None:
        raise HyperlexError(f"persona {persona!r} has no adapter to answer with (--self)")
    params = chosen.contract.params()
    if self_replay:
        params = params.updated(distilling.SELF_REPLAY_SAMPLING)
    params = params.updated(parse_options(options), "-o")
    if prompts_file is not None:
        prompts = distilling.read_prompts(prompts_file)
    else:
        others = [p for p in host.personas.values() if not (p.is_layer or p.is_mood)]
        prompts = distilling.fresh_prompts(chosen, others, fresh_prompts, seed, out)
    if teacher_url:
        teacher: Any = distilling.OpenAITeacher(teacher_url, teacher_model,
                                                distilling.api_key_from(api_key_env))
    else:
        from hyperlex.engines.torch.engine import TorchEngine

        engine = TorchEngine([chosen] if self_replay else [], base=base, dtype=dtype,
                             quantize=quantize)
        teacher = distilling.LocalTeacher(engine, chosen.name if self_replay else None)
    with tqdm(total=len(distilling.pending(prompts, out)), desc=f"distilling {persona}",
              unit="prompt", file=sys.stderr) as bar:
        stats = distilling.distill(prompts, chosen, teacher, out, params, batch_size,
                                   on_batch=bar.update)
    click.echo(f"{out}: {stats['written']} new records ({stats['skipped_existing']} prompts "
               f"already done, {stats['empty_replies']} empty replies dropped)", err=True)


@data.command("synth")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--direction", type=click.Choice(["output", "input", "both"]), default="output",
              show_default=True,
              help="output: scene -> text records; input: text -> scene records.")
@click.option("--count", type=click.IntRange(1), default=1000, show_default=True,
              help="Scenes to generate (each verified to read back).")
@click.option("--split", type=click.Choice(["train", "heldout"]), default="train",
              show_default=True, help="Which side of the fixed train/held-out split.")
@click.option("--register", "registers", multiple=True,
              type=click.Choice(["plain", "story", "report"]),
              help="Registers to write in (repeatable; default: all).")
@click.option("--scenes", "as_scenes", is_flag=True,
              help="Write evaluation scenes (for agent eval roundtrip --scenes FILE) instead "
                   "of training records.")
@click.option("--seed", default=0, show_default=True)
def data_synth(out: Path, direction: str, count: int, split: str, registers: tuple[str, ...],
               as_scenes: bool, seed: int) -> None:
    """Write a synthetic scene <-> text corpus: scenes of 2-8 things and 1-5 links (a third
    negated) over thousands of lemmas, each text verified to read back to its scene with
    the default encoder (docs/data.md)."""
    from tqdm import tqdm

    from hyperlex.training.data import write_records
    from hyperlex.training.synth import REGISTERS, eval_scene_lines, synth_records

    chosen = registers or REGISTERS
    if as_scenes:
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("w", encoding="utf-8") as file:
            for line in tqdm(eval_scene_lines(count, split, seed, chosen), total=count,
                             desc="scenes", unit="scene", file=sys.stderr):
                file.write(line + "\n")
        click.echo(f"{out}: {count} {split} scenes", err=True)
        return
    written = write_records(out, synth_records(count, direction, seed, split, chosen))
    click.echo(f"{out}: {written} records", err=True)


@data.command("replay")
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(1), default=80, show_default=True,
              help="Texts to sample (the scene-writer's round 4 mixed 80 into 360 scenes).")
@click.option("--max-tokens", type=click.IntRange(16), default=160, show_default=True,
              help="Tokens per text.")
@click.option("--min-words", type=click.IntRange(1), default=24, show_default=True,
              help="Shorter samples are dropped.")
@click.option("--batch-size", type=click.IntRange(1, 256), default=8, show_default=True)
@click.option("--seed", default=0, show_default=True)
@click.option("--base", default=None, metavar="MODEL", help="Base model (default: embedded).")
def data_replay(out: Path, count: int, max_tokens: int, min_words: int, batch_size: int,
                seed: int, base: str | None) -> None:
    """Write replay records: plain text sampled from the bare base model at temperature 1.
    Mixed into a round (agent train --extra-data), they hold an adapter near the base on
    ordinary text, so its neutral perplexity ratio stays low (docs/data.md)."""
    from tqdm import tqdm

    from hyperlex.engines.models import load_base, resolve_base
    from hyperlex.training.data import write_records
    from hyperlex.training.replay import replay_texts

    model, tokenizer = load_base(resolve_base(base))
    with tqdm(total=count, desc="replay", unit="text", file=sys.stderr) as bar:
        texts = list(replay_texts(model, tokenizer, count, seed, max_tokens, batch_size,
                                  min_words, on_batch=bar.update))
    written = write_records(out, ({"plain": text} for text in texts))
    click.echo(f"{out}: {written} records", err=True)




@data.command("read")
@click.option("--out", default="plugins/reader/data/train.jsonl", show_default=True,
              type=click.Path(dir_okay=False, path_type=Path))
@click.option("--count", type=click.IntRange(0), default=160, show_default=True,
              help="Verified synthetic texts (the corpus's train split) to read.")
@click.option("-p", "--persona", "names", multiple=True,
              help="Persona whose data to read (repeatable; default: every persona that "
                   "is not a layer or a mood).")
@click.option("--voice", type=click.IntRange(0), default=16, show_default=True,
              help="Sentences from each persona's data to read (half of them, where there "
                   "are enough, with a negated link).")
@click.option("--seed", default=0, show_default=True)
def data_read(out: Path, count: int, names: tuple[str, ...], voice: int, seed: int) -> None:
    """Write the scene-reader's training records: texts with the default encoder's reading
    of each as the reply (JSON, hyperlexemes and links by label), from the synthetic corpus
    and from the sentences of the cast's data, its replies and its users' messages
    (docs/scene.md#the-scene-reader)."""
    from tqdm import tqdm

    from hyperlex.training.data import write_records
    from hyperlex.training.synth import bundle_sentences, reading_records, voice_reading_records

    records = list(tqdm(reading_records(count, seed), total=count, desc="synthetic",
                        unit="text", file=sys.stderr))
    synthetic = len(records)
    host = get_host()
    chosen = [host.persona(n) for n in names] or [
        p for p in host.personas.values() if not (p.is_layer or p.is_mood)]
    personas = [p for p in chosen if p.root and (p.root / "data").is_dir()]
    for persona in tqdm(personas, desc="voices", unit="persona", file=sys.stderr):
        records += voice_reading_records(bundle_sentences(persona.root), voice, seed)
    written = write_records(out, records)
    click.echo(f"{out}: {written} records ({synthetic} synthetic texts and "
               f"{written - synthetic} sentences of {len(personas)} personas' data; texts "
               "the reader's schema cannot hold are left out)", err=True)


@data.command("hindsight")
@click.option("-p", "--persona", "names", multiple=True,
              help="Persona to build records for (repeatable; default: every persona with "
              "training data that is not a layer or a mood).")
@click.option("--count", type=click.IntRange(1), default=160, show_default=True,
              help="Records per persona at most (windows with a negated link first).")
@click.option("--max-hyperlexemes", type=click.IntRange(2), default=8, show_default=True,
              help="The most things a window's scene may hold.")
@click.option("--encoder", default="default", show_default=True,
              help="Scene encoder that reads the windows.")
@click.option("--chat", is_flag=True,
              help="Chat turns instead: a user's plain statement of up to two of a window's "
                   "links (negated ones first), answered by the window.")
@click.option("--negate", is_flag=True,
              help="Counterfactual chat turns instead: one affirmed link of each window "
                   "negated in the reply (\"sees\" -> \"does not see\", checked by the "
                   "encoder) and stated by the user.")
@click.option("--whole-reply", is_flag=True,
              help="With --chat or --negate: answer with the whole voice reply, the window "
                   "(negated) in its place, one record per reply, instead of the window "
                   "alone.")
@click.option("--out", default=None, metavar="FILE",
              help="Where the records go, relative to each persona's bundle (overwritten; "
                   "default data/hindsight.jsonl, with --chat data/hindsight-chat.jsonl, "
                   "with --negate data/hindsight-negated.jsonl; -whole.jsonl with "
                   "--whole-reply).")
@click.option("--seed", default=0, show_default=True, help="Which windows, beyond the negated.")
@click.option("--json", "as_json", is_flag=True, help="Print each persona's counts as JSON.")
def data_hindsight(names: tuple[str, ...], count: int, max_hyperlexemes: int, encoder: str,
                   chat: bool, negate: bool, whole_reply: bool, out: str | None, seed: int,
                   as_json: bool) -> None:
    """Hindsight scene records: windows of each persona's own training replies, each with
    the scene the encoder reads in it, as speak_scene records (faithful and in voice by
    construction; docs/data.md). Train on them with agent train BUNDLE --extra-data FILE.

    --chat builds chat turns instead: the user states up to two of a window's facts in
    plain words, negated ones first, and the window answers. --negate builds the chat turns
    of counterfactual windows: one affirmed fact negated by one verb, in the reply and in the
    user's statement (docs/data.md). --whole-reply answers either with the whole voice reply,
    the window in its place."""
    from hyperlex.cli.common import report_problems
    from hyperlex.engines.models import load_tokenizer, resolve_base
    from hyperlex.training.data import parse_record, read_dataset, write_records
    from hyperlex.training.hindsight import hindsight_records, negated
    from hyperlex.training.train import encode_example, load_config

    if whole_reply and not (chat or negate):
        raise click.UsageError("--whole-reply needs --chat or --negate")
    if out is None:
        out = ("data/hindsight-negated" if negate else
               "data/hindsight-chat" if chat else "data/hindsight")
        out += "-whole.jsonl" if whole_reply else ".jsonl"
    host = get_host()
    report_problems(host)
    if encoder not in host.scene_encoders:
        raise click.BadParameter(f"unknown encoder {encoder!r}", param_hint="'--encoder'")
    read = host.scene_encoders[encoder]
    chosen = {n: host.persona(n) for n in names} or {
        n: p for n, p in host.personas.items() if not (p.is_layer or p.is_mood)}

    def fits_training(persona: Any, limit: int) -> Any:
        """Whether a record's prompt and whole reply fit in ``limit`` tokens of the base (a
        record cut short would teach half a window)."""
        return lambda record: len(encode_example(tokenizer, persona, parse_record(record),
                                                 limit + 1)[0]) <= limit

    tokenizer = load_tokenizer(resolve_base(None))
    summary = []
    for name, persona in chosen.items():
        config = load_config(persona.root) if persona.root else None
        source = persona.root / config.data if config else None
        if source is None or not source.is_file():
            if names:
                raise HyperlexError(f"persona {name!r} has no training data to read")
            continue
        target = persona.root / out
        if not target.resolve().is_relative_to(persona.root.resolve()):
            raise click.BadParameter(f"{out!r} points outside the bundle {persona.root}",
                                     param_hint="'--out'")
        replies = [(e.line, e.text) for e in read_dataset(source) if e.is_chat]
        records = hindsight_records(replies, read, count, seed, max_hyperlexemes,
                                    fits=fits_training(persona, config.max_length), chat=chat,
                                    negate=negate, whole_reply=whole_reply)
        write_records(target, records)
        with_negation = sum(map(negated, records))
        summary.append({"persona": name, "replies": len(replies), "records": len(records),
                        "negated": with_negation, "file": str(target)})
        click.echo(f"{name}: {len(records)} records from {len(replies)} replies "
                   f"({with_negation} with a negated link) -> {target}", err=True)
    if as_json:
        emit_json(summary)


@data.command("faithful")
@click.option("-p", "--persona", "names", multiple=True,
              help="Persona to build data for (repeatable; default: every persona with an "
              "adapter that is not itself a layer).")
@click.option("--count", type=click.IntRange(1), default=24, show_default=True,
              help="Training scenes (the synthetic corpus's train split) per persona.")
@click.option("--compose", "compose", multiple=True, metavar="LAYER[:WEIGHT]",
              default=("writer:0.5", "writer:1"), show_default=True,
              help="Proposals besides the persona alone: LAYER composed over it at WEIGHT "
              "(repeatable).")
@click.option("--alone/--no-alone", default=True, show_default=True,
              help="Propose the persona alone as well as the compositions (--no-alone: only "
                   "the compositions, which keep more of the scene; half the time with one "
                   "--compose).")
@click.option("--min-recall", type=click.FloatRange(0, 1), default=0.75, show_default=True,
              help="Hyperlexeme recall a candidate must reach.")
@click.option("--min-link-recall", type=click.FloatRange(0, 1), default=0.5, show_default=True,
              help="Relaxed link recall a candidate must reach.")
@click.option("--chat", is_flag=True,
              help="Chat turns instead of spoken scenes: each persona answers a user's "
                   "statement of a negated fact (cut from the corpus's train split) as in agent "
                   "chat, and the replies that keep every negated fact in its voice are kept.")
@click.option("--samples", type=click.IntRange(1), default=2, show_default=True,
              help="With --chat: sampled replies per proposal and statement (seeds 1..N, the "
                   "persona's own sampling settings).")
@click.option("--statements", "statements_file", default=None, metavar="FILE",
              type=click.Path(dir_okay=False, path_type=Path),
              help="With --chat: the user's messages, one per line, each stating a negated "
                   "fact (default: --count statements cut from the corpus's train split).")
@guidance_option(also=" With --chat: every proposal is sampled both unguided and guided at "
                      "this weight.")
@click.option("--out", default=None, metavar="FILE",
              help="Where the records go, relative to each persona's bundle (overwritten; "
                   "default data/faithful.jsonl, with --chat data/faithful-chat.jsonl).")
@click.option("--encoder", default="default", show_default=True,
              help="Scene encoder that reads the candidates back.")
@click.option("--seed", default=1, show_default=True, help="Which training scenes.")
@click.option("--max-new-tokens", default=120, show_default=True, type=click.IntRange(1))
@click.option("--batch-size", default=16, show_default=True, type=click.IntRange(1))
@click.option("--json", "as_json", is_flag=True, help="Print each persona's counts as JSON.")
@engine_options
def data_faithful(names: tuple[str, ...], count: int, compose: tuple[str, ...], alone: bool,
                  min_recall: float, min_link_recall: float, chat: bool, samples: int,
                  statements_file: Path | None, guidance: float, out: str | None,
                  encoder: str, seed: int,
                  max_new_tokens: int, batch_size: int, as_json: bool, base: str | None,
                  dtype: str, quantize: str | None) -> None:
    """Self-distillation data: each persona speaks training scenes alone and with the
    scene-writer composed over it; the replies that read back to their scene, that the
    fidelity classifier gives to the persona and that name no agent command, option or
    persona that does not exist become its speak_scene records (docs/data.md).
    Train on them with agent train BUNDLE --init-adapter adapter/ --extra-data FILE.

    --chat builds chat-turn records instead (docs/verification.md, "Negation in a
    conversation").
    """
    from hyperlex.cli.command_refs import CommandReferences
    from hyperlex.cli.common import compositions, open_engine, report_problems
    from hyperlex.eval.faithful import (
        chat_proposals,
        chat_records,
        chat_statements,
        faithful_records,
    )
    from hyperlex.eval.fidelity import PersonaClassifier, load_sets
    from hyperlex.eval.negation import load_statements
    from hyperlex.eval.roundtrip import EvalScene, speaking_params
    from hyperlex.training.data import write_records
    from hyperlex.training.synth import scene_records
    from hyperlex.training.train import load_config

    out = out or ("data/faithful-chat.jsonl" if chat else "data/faithful.jsonl")
    for given, flag in ((statements_file, "--statements"), (guidance, "--guidance")):
        if given and not chat:
            raise click.UsageError(f"{flag} is for chat turns; add --chat")
    host = get_host()
    report_problems(host)
    speakers = {n: p for n, p in host.personas.items() if not p.is_mood
                and p.adapter_dir is not None and p.root is not None
                and (p.root / load_config(p.root).data).is_file()}
    chosen = {n: host.persona(n) for n in names} or {
        n: p for n, p in speakers.items() if not p.is_layer}
    for name, persona in chosen.items():
        if name not in speakers:
            raise HyperlexError(f"persona {name!r} has no adapter and training data to start "
                                "from (train it first)")
        if not (persona.root / out).resolve().is_relative_to(persona.root.resolve()):
            raise click.BadParameter(f"{out!r} points outside the bundle {persona.root}",
                                     param_hint="'--out'")
    composed = [(layer,) for layer in compositions(host, compose)]
    proposals = [(), *composed] if alone else composed
    if encoder not in host.scene_encoders:
        raise click.BadParameter(f"unknown encoder {encoder!r}", param_hint="'--encoder'")
    reader = host.scene_encoders[encoder]
    if chat and statements_file is not None:
        scenes = load_statements(host.scene_encoders["default"], statements_file)
    elif chat:
        scenes = chat_statements(count, "train", seed, host.scene_encoders["default"])
    else:
        scenes = [EvalScene(item["id"], item["scene"], item["reference"], "synth")
                  for item in scene_records(count, "train", seed)]
    click.echo("fitting the voice classifier", err=True)
    classifier = PersonaClassifier({n: load_sets(p)[1] for n, p in speakers.items()
                                    if not p.is_layer})
    engine = open_engine(host, base, dtype, quantize,
                         only=[*chosen, *(s[0][0] for s in proposals if s)])
    commands = CommandReferences.of_this_cli(host.personas)
    summary = []
    for name, persona in chosen.items():
        if chat:
            sampled = chat_proposals(proposals, persona.contract.params(), samples, guidance)
            run = chat_records(engine, persona, scenes, sampled, reader, classifier,
                               batch_size, progress=lambda m: click.echo(m, err=True),
                               reply_problem=commands.problem)
        else:
            run = faithful_records(engine, persona, scenes, proposals, reader, classifier,
                                   speaking_params(max_new_tokens), batch_size,
                                   min_recall, min_link_recall,
                                   progress=lambda m: click.echo(m, err=True),
                                   reply_problem=commands.problem)
        target = persona.root / out
        write_records(target, run.records)
        summary.append({**run.as_dict(), "file": str(target)})
        click.echo(f"{name}: {len(run.records)}/{len(scenes)} scenes kept "
                   f"({run.candidates} candidates; accepted {dict(run.accepted)}; refused "
                   f"{dict(run.refused)}) -> {target}", err=True)
    if as_json:
        emit_json(summary)
