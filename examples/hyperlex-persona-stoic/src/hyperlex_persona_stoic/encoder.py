"""The stoic's scene encoder: hyperlex's default encoder, plus the Stoic's first question
about everything mentioned, whether it is up to us. Each hyperlexeme whose label (or its
last word) is in ``control.tsv`` gets ``control: within`` (judgements, choices, effort) or
``control: outside`` (weather, other people, reputation, death ...), so the scene the stoic
reads, and ``/scene`` shows, says what the conversation put in and out of the person's
hands."""

from __future__ import annotations

from importlib import resources

from hyperlex import DefaultEncoder, Delta


def load_control_words() -> dict[str, str]:
    words = {}
    text = resources.files(__package__).joinpath("control.tsv").read_text(encoding="utf-8")
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        word, _, control = line.partition("\t")
        if control.strip() not in ("within", "outside"):
            raise ValueError(f"control.tsv line {number}: expected WORD<TAB>within|outside")
        words[word.strip().lower()] = control.strip()
    return words


class SceneEncoder:
    def __init__(self) -> None:
        self._default = DefaultEncoder()
        self.control = load_control_words()

    def warm_up(self) -> None:
        self._default.warm_up()

    def __call__(self, text: str) -> Delta:
        delta = self._default(text)
        for item in delta.hyperlexemes:
            label = item.label.lower()
            control = self.control.get(label) or self.control.get(label.rsplit(" ", 1)[-1])
            if control:
                item.attrs["control"] = control
        return delta
