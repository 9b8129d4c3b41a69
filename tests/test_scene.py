"""Example-based tests of the scene operations: apply, diff, render, table rows."""

from __future__ import annotations

import copy

import pytest

from hyperlex.scene.model import (
    LINK_WEIGHT_CAP,
    SALIENCE_CAP,
    USER,
    Delta,
    Hyperlexeme,
    Link,
    Scene,
    SceneField,
    estimate_tokens,
    slugify,
)


def hx(hid: str, label: str, kind: str = "entity", **attrs: object) -> Hyperlexeme:
    return Hyperlexeme(id=hid, label=label, kind=kind, attrs=dict(attrs))


def cat_on_mat(polarity: int = 1) -> Delta:
    return Delta([hx("c", "cat"), hx("m", "mat")], [Link("c", "on", "m", polarity)])


def test_two_turns_mentioning_the_sea_merge_into_one_hyperlexeme() -> None:
    first = Scene().apply(Delta([hx("s", "the sea", colour="grey")]), turn=1)
    second = first.apply(Delta([hx("x", "The  Sea", mood="calm"), hx("b", "boat")]), turn=2)

    assert list(first.hyperlexemes) == ["the_sea"]
    assert sorted(second.hyperlexemes) == ["boat", "the_sea"]
    sea = second.hyperlexemes["the_sea"]
    assert sea.label == "the sea"
    assert sea.attrs == {"colour": "grey", "mood": "calm"}
    assert sea.salience == pytest.approx(0.8 + 1.0)
    assert sea.source_turn == 1
    assert second.hyperlexemes["boat"].salience == 1.0
    assert second.focus == ["the_sea", "boat"]
    assert (first.version, second.version) == (1, 2)


def test_merge_keeps_kind_and_lets_the_delta_win_attrs_and_union_associations() -> None:
    scene = Scene().apply(
        Delta([Hyperlexeme("a", "sea", "entity", {"colour": "grey"}, associations=["salt"])])
    )
    again = Hyperlexeme("b", "SEA", "concept", {"colour": "blue"}, associations=["wave", "salt"])
    later = scene.apply(Delta([again]))
    sea = later.hyperlexemes["sea"]
    assert sea.kind == "entity"
    assert sea.attrs == {"colour": "blue"}
    assert sea.associations == ["salt", "wave"]


def test_repeats_within_one_delta_count_as_one_mention() -> None:
    delta = Delta([hx("a", "Moon", phase="full"), hx("b", "moon", colour="pale"), hx("a", "moon")])
    scene = Scene().apply(delta)
    assert list(scene.hyperlexemes) == ["moon"]
    moon = scene.hyperlexemes["moon"]
    assert moon.salience == 1.0
    assert moon.attrs == {"phase": "full", "colour": "pale"}


def test_new_ids_are_slugs_deduplicated_with_a_suffix() -> None:
    delta = Delta([hx("a", "Old  Man"), hx("b", "a b"), hx("c", "a_b"), hx("d", "!?")])
    scene = Scene().apply(delta)
    assert sorted(scene.hyperlexemes) == ["a_b", "a_b_2", "h", "old_man"]
    assert slugify("Café  au lait") == "café_au_lait"


def test_salience_is_capped() -> None:
    scene = Scene()
    for turn in range(5):
        scene = scene.apply(Delta([hx("s", "sea")]), turn, bump=3.0, decay=1.0)
    assert scene.hyperlexemes["sea"].salience == SALIENCE_CAP


def test_negation_flips_the_link_and_restarts_its_weight() -> None:
    scene = Scene().apply(cat_on_mat(), 1).apply(cat_on_mat(), 2)
    assert [(k.polarity, k.weight) for k in scene.links] == [(1, 2.0)]

    flipped = scene.apply(cat_on_mat(-1), 3)
    assert len(flipped.links) == 1
    link = flipped.links[0]
    assert (link.src, link.rel, link.dst) == ("cat", "on", "mat")
    assert (link.polarity, link.weight) == (-1, 1.0)
    assert flipped.render() == "cat; mat\ncat NOT on mat"

    confirmed = flipped.apply(cat_on_mat(-1), 4)
    assert [(k.polarity, k.weight) for k in confirmed.links] == [(-1, 2.0)]


def test_link_weight_is_capped_and_rel_matches_canonically() -> None:
    scene = Scene()
    for turn in range(10):
        rel = "on" if turn % 2 else " ON "
        scene = scene.apply(Delta([hx("c", "cat"), hx("m", "mat")], [Link("c", rel, "m")]), turn)
    assert len(scene.links) == 1
    assert scene.links[0].rel == "ON"
    assert scene.links[0].weight == LINK_WEIGHT_CAP


def test_last_link_in_a_delta_wins() -> None:
    delta = Delta(
        [hx("c", "cat"), hx("m", "mat")],
        [Link("c", "on", "m", 1), Link("c", "on", "m", -1)],
    )
    scene = Scene().apply(delta)
    assert [(k.polarity, k.weight) for k in scene.links] == [(-1, 1.0)]


def test_self_links_are_allowed() -> None:
    scene = Scene().apply(Delta([hx("m", "mind")], [Link("m", "knows", "m")]))
    assert scene.render() == "mind\nmind knows mind"


def test_a_link_to_an_unknown_id_is_an_error_naming_the_link() -> None:
    delta = Delta([hx("c", "cat")], [Link("c", "on", "ghost")])
    with pytest.raises(ValueError, match=r"c -on-> ghost: unknown id\(s\) ghost"):
        Scene().apply(delta)


def test_a_delta_id_used_for_two_labels_is_an_error() -> None:
    with pytest.raises(ValueError, match="names two hyperlexemes"):
        Scene().apply(Delta([hx("a", "cat"), hx("a", "dog")]))


@pytest.mark.parametrize(
    "kwargs",
    [{"bump": 0}, {"decay": 1.5}, {"focus_size": -1}, {"field_weight": 2}, {"floor": 0}],
)
def test_out_of_range_arguments_are_errors(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        Scene().apply(Delta(), **kwargs)


def test_decay_forgets_an_unlinked_hyperlexeme_but_keeps_a_linked_one() -> None:
    scene = Scene().apply(
        Delta([hx("g", "gull"), hx("c", "cat"), hx("m", "mat")], [Link("c", "on", "m")]), 0
    )
    for turn in range(1, 14):
        scene = scene.apply(Delta(), turn)
    assert scene.hyperlexemes["gull"].salience == pytest.approx(0.8**13)

    scene = scene.apply(Delta(), 14)
    assert "gull" not in scene.hyperlexemes
    assert scene.hyperlexemes["cat"].salience == 0.05
    assert scene.hyperlexemes["mat"].salience == 0.05
    assert len(scene.links) == 1


def test_apply_does_not_mutate_its_inputs() -> None:
    scene = Scene().apply(cat_on_mat(), 1)
    delta = Delta([hx("c", "Cat", colour="black")], [Link("c", "sees", "c", -1)],
                  SceneField(0.5, 0.5))
    before_scene, before_delta = copy.deepcopy(scene), copy.deepcopy(delta)
    after = scene.apply(delta, 2)
    after.hyperlexemes["cat"].attrs["colour"] = "white"
    assert scene == before_scene
    assert delta == before_delta


def test_field_moves_toward_the_delta_and_keeps_old_strings_for_defaults() -> None:
    sad = SceneField(valence=-0.8, arousal=0.6, emotion="sad", tempo="slow")
    scene = Scene().apply(Delta(field=sad))
    assert (scene.field.valence, scene.field.arousal) == pytest.approx((-0.4, 0.3))
    assert (scene.field.emotion, scene.field.tempo) == ("sad", "slow")

    calm = scene.apply(Delta(field=SceneField(valence=0.0, arousal=0.0, tone="warm")))
    assert (calm.field.valence, calm.field.arousal) == pytest.approx((-0.2, 0.15))
    assert (calm.field.emotion, calm.field.tempo, calm.field.tone) == ("sad", "slow", "warm")

    unread = calm.apply(Delta(field=None))
    assert unread.field == calm.field


def test_field_is_clamped() -> None:
    scene = Scene().apply(Delta(field=SceneField(valence=-9.0, arousal=9.0)), field_weight=1.0)
    assert (scene.field.valence, scene.field.arousal) == (-1.0, 1.0)


def test_focus_is_the_most_salient_then_most_recent_then_label() -> None:
    scene = Scene().apply(Delta([hx("a", "anchor"), hx("z", "zebra")]), 1)
    scene = scene.apply(Delta([hx("b", "bell"), hx("y", "yak")]), 2)
    scene = scene.apply(Delta([hx("z", "zebra")]), 3)
    assert scene.ranked() == ["zebra", "bell", "yak", "anchor"]
    assert scene.apply(Delta(), 4, focus_size=2).focus == ["zebra", "bell"]


def test_diff_render_text() -> None:
    before = Scene().apply(
        Delta([hx("c", "cat"), hx("m", "mat"), hx("s", "sea")], [Link("c", "on", "m")]), 1
    )
    after = Scene(
        hyperlexemes={
            "cat": before.hyperlexemes["cat"],
            "sea": Hyperlexeme("sea", "sea", "entity", {"colour": "grey"}, 1.0, source_turn=1),
            "gull": Hyperlexeme("gull", "gull", "entity", source_turn=2),
        },
        links=[Link("cat", "on", "mat", -1), Link("gull", "over", "sea", 1, 2.0)],
        field=SceneField(valence=-0.4, emotion="sad"),
        focus=before.focus,
    )
    diff = before.diff(after)
    assert diff.added == ["gull"]
    assert diff.removed == ["mat"]
    assert diff.changed == ["sea"]
    assert diff.render() == (
        "+ gull\n- mat\n~ sea\n+ cat NOT on mat\n+ gull over sea\n- cat on mat\n"
        "valence: +0.00 -> -0.40\nemotion: neutral -> sad"
    )
    data = diff.to_dict()
    assert data["field_changes"] == {"valence": [0.0, -0.4], "emotion": ["neutral", "sad"]}
    assert data["labels"] == {"cat": "cat", "gull": "gull", "mat": "mat", "sea": "sea"}
    assert not diff.empty


def test_diff_of_equal_scenes_is_empty_and_ignores_version() -> None:
    scene = Scene().apply(cat_on_mat(), 1)
    again = Scene.from_json(scene.to_json())
    again.version = 7
    diff = scene.diff(again)
    assert diff.empty
    assert diff.render() == ""


def test_diff_reports_weight_and_focus_changes() -> None:
    one = Scene().apply(cat_on_mat(), 1)
    two = one.apply(cat_on_mat(), 2, focus_size=1)
    diff = one.diff(two)
    assert [(o.weight, n.weight) for o, n in diff.links_changed] == [(1.0, 2.0)]
    assert diff.focus_change == (["cat", "mat"], ["cat"])
    assert "~ cat on mat (weight 1.00 -> 2.00)" in diff.render().splitlines()
    assert "focus: cat, mat -> cat" in diff.render().splitlines()


def salient_scene() -> Scene:
    scene = Scene().apply(Delta([hx("g", "gull", size="small")]), 1)
    scene = scene.apply(Delta([hx("c", "cat", colour="black"), hx("m", "mat")]), 2)
    delta = Delta([hx("c", "cat"), hx("m", "mat"), hx("s", "sea")], [Link("c", "on", "m", -1)])
    return scene.apply(delta, 3, focus_size=2)


def test_render_orders_by_salience_and_keeps_the_line_format() -> None:
    scene = salient_scene()
    assert scene.render() == "cat[colour=black]; mat; sea; gull[size=small]\ncat NOT on mat"
    assert scene.render("focus") == "cat[colour=black]; mat\ncat NOT on mat"
    assert scene.render("none") == ""
    assert Scene().render() == ""


def test_render_with_a_budget_drops_the_least_salient_first() -> None:
    scene = salient_scene()
    full = scene.render()
    assert scene.render(max_tokens=estimate_tokens(full)) == full
    assert scene.render(max_tokens=14) == "cat[colour=black]; mat; sea\ncat NOT on mat"
    assert scene.render(max_tokens=10) == "cat[colour=black]; mat\ncat NOT on mat"
    assert scene.render(max_tokens=5) == "cat[colour=black]"
    assert scene.render(max_tokens=4) == ""
    assert scene.render(max_tokens=0) == ""

    def words(text: str) -> int:
        return len(text.split())

    with_mat = "cat[colour=black]; mat\ncat NOT on mat"
    assert scene.render(max_tokens=6, count_tokens=words) == with_mat
    assert scene.render(max_tokens=5, count_tokens=words) == "cat[colour=black]"


def test_unknown_view_is_an_error() -> None:
    with pytest.raises(ValueError, match="view"):
        Scene().render("everything")


def test_table_rows() -> None:
    rows = salient_scene().table_rows()
    assert [(label, mark) for label, _, _, _, mark, _ in rows] == [
        ("cat", "focus"),
        ("mat", "focus"),
        ("sea", ""),
        ("gull", ""),
    ]
    assert rows[0][1:4] == ("entity", pytest.approx(1.8), "colour=black")


def test_json_round_trip_after_apply() -> None:
    scene = salient_scene()
    again = Scene.from_json(scene.to_json())
    assert again == scene
    assert again.to_json() == scene.to_json()


# provenance ---------------------------------------------------------------------------------

def old_man_distrusts_sea() -> Delta:
    return Delta([hx("m", "old man"), hx("s", "sea")], [Link("m", "trust", "s", -1)])


def poets_elaboration() -> Delta:
    return Delta([hx("k", "keeper"), hx("s", "sea"), hx("m", "old man")],
                 [Link("m", "trust", "s", 1), Link("k", "watch", "s", 1)])


def test_the_scene_records_who_said_what() -> None:
    scene = Scene().apply(old_man_distrusts_sea(), 1, speaker=USER)
    scene = scene.apply(poets_elaboration(), 1, speaker="poet")
    assert scene.hyperlexemes["old_man"].said_by == ["user", "poet"]
    assert scene.hyperlexemes["keeper"].said_by == ["poet"]
    trust = next(k for k in scene.links if k.rel == "trust")
    watch = next(k for k in scene.links if k.rel == "watch")
    assert (trust.polarity, trust.said_by, trust.turn) == (-1, "user", 1)  # not overruled
    assert (watch.said_by, watch.turn) == ("poet", 1)
    assert Scene.from_json(scene.to_json()) == scene


def test_the_users_facts_outrank_a_personas_elaborations() -> None:
    scene = Scene().apply(old_man_distrusts_sea(), 1, speaker=USER)
    for turn in range(1, 4):  # three persona replies, each inventing more
        extra = Delta([hx("a", f"invention {turn}"), hx("b", f"detail {turn}")],
                      [Link("a", "fills", "b")])
        scene = scene.apply(extra, turn, speaker="poet", focus_size=2)
    assert scene.hyperlexemes["invention_3"].salience == 0.5  # an elaboration bumps half
    assert scene.focus == ["old_man", "sea"]
    first, *rest = scene.render().split("\n")
    assert first.startswith("old man; sea; detail 3 (by poet); invention 3 (by poet); ")
    assert rest[0] == "old man NOT trust sea"
    assert "invention 3 fills detail 3 (by poet)" in rest


def test_only_the_user_changes_the_users_facts() -> None:
    scene = Scene().apply(old_man_distrusts_sea(), 1, speaker=USER)
    flipped = Delta([hx("m", "old man"), hx("s", "sea")], [Link("m", "trust", "s", 1)])
    assert scene.apply(flipped, 2, speaker="poet").links[0].polarity == -1
    changed = scene.apply(flipped, 3, speaker=USER).links[0]
    assert (changed.polarity, changed.said_by, changed.turn) == (1, "user", 3)


def test_scenes_saved_before_provenance_load_as_facts() -> None:
    old = ('{"version": 1, "hyperlexemes": [{"id": "sea", "label": "sea", "kind": "entity", '
           '"attrs": {}, "salience": 1.0, "associations": [], "source_turn": 0}], '
           '"links": [{"src": "sea", "rel": "is", "dst": "sea", "polarity": 1, '
           '"weight": 1.0}], "focus": ["sea"]}')
    scene = Scene.from_json(old)
    assert scene.hyperlexemes["sea"].is_fact and scene.links[0].is_fact
    assert scene.render() == "sea\nsea is sea"


@pytest.mark.parametrize(("kwargs", "problem"), [
    ({"speaker": ""}, "speaker must be a non-empty name"),
    ({"speaker": "poet", "elaboration": 0}, "elaboration must be in"),
])
def test_bad_provenance_arguments_are_refused(kwargs: dict, problem: str) -> None:
    with pytest.raises(ValueError, match=problem):
        Scene().apply(Delta(), 1, **kwargs)
