"""Does what a text says agree with a scene's links? Links are compared by their endpoints'
canonical labels, so two readings with their own ids can be matched.

The matching is the round trip's (``agent eval roundtrip``) and the reply check's
(``agent chat --best-of``): a source link is matched first by the same (source, relation,
destination) triple, and then, one to one, by any remaining link between the same two
hyperlexemes, whatever its relation and direction ("the sailor never noticed the
lighthouse" keeps ``sailor NOT see lighthouse`` as a relation between the two). A matched
pair whose polarities differ is a flip: a negation lost or invented.
"""

from __future__ import annotations

from collections.abc import Iterable

from hyperlex.scene.model import Delta, Hyperlexeme, Link, canonical_label

Triple = tuple[str, str, str]


def delta_sets(delta: Delta) -> tuple[dict[str, str], dict[Triple, int]]:
    """Predicted labels (label -> kind) and triples (-> polarity) of a delta."""
    kinds = {canonical_label(h.label): h.kind for h in delta.hyperlexemes}
    return kinds, link_triples(delta.hyperlexemes, delta.links)


def link_triples(hyperlexemes: Iterable[Hyperlexeme], links: Iterable[Link]) -> dict[Triple, int]:
    """Each link as (source label, relation, destination label) -> polarity. A dangling id
    counts as a wrong link (``?id``); when one triple comes with both polarities, the
    negative one is kept."""
    by_id = {h.id: canonical_label(h.label) for h in hyperlexemes}
    triples: dict[Triple, int] = {}
    for link in links:
        src, dst = by_id.get(link.src), by_id.get(link.dst)
        if src is None or dst is None:
            src, dst = src or f"?{link.src}", dst or f"?{link.dst}"
        triple = (src, canonical_label(link.rel), dst)
        triples[triple] = min(triples.get(triple, 1), link.polarity)
    return triples


def pair_links(source: dict[Triple, int], reply: dict[Triple, int]
               ) -> tuple[list[tuple[Triple, Triple]], list[Triple]]:
    """The strict pairs (same triple), then the relaxed ones (same two endpoints, one to
    one, a reply link of the same polarity preferred), and the source triples left
    unmatched, in sorted order."""
    strict = sorted(set(source) & set(reply))
    used = set(strict)
    pairs = [(t, t) for t in strict]
    unmatched = []
    for triple in sorted(set(source) - used):
        ends = {triple[0], triple[2]}
        candidates = [t for t in sorted(reply) if t not in used and {t[0], t[2]} == ends]
        if not candidates:
            unmatched.append(triple)
            continue
        same = [t for t in candidates if reply[t] == source[triple]]
        chosen = (same or candidates)[0]
        used.add(chosen)
        pairs.append((triple, chosen))
    return pairs, unmatched
