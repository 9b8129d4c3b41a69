"""The package's own checks: the bundle is valid, hyperlex finds it through the
entry point, and the persona answers on the base model."""

from hyperlex import GenerationParams, Host, Persona, build_prompt, open_engine

from hyperlex_persona_stoic import BUNDLE


def test_the_bundle_is_valid():
    persona = Persona.from_dir(BUNDLE)
    assert persona.name == "stoic"
    assert persona.scene_encoder == "stoic-scene"


def test_hyperlex_finds_the_persona_and_its_encoder_through_the_entry_point():
    host = Host()
    assert host.persona_registrations["stoic"].plugin == "stoic"
    assert "stoic-scene" in host.scene_encoders


def test_the_persona_answers():
    persona = Persona.from_dir(BUNDLE)
    engine = open_engine([persona], progress=False)
    messages = build_prompt(persona, "Hello, who are you?")
    reply = engine.generate(messages, "stoic",
                            GenerationParams(temperature=0, max_new_tokens=24))
    assert reply.text.strip()


def test_the_scene_encoder_marks_what_is_up_to_us():
    from hyperlex_persona_stoic.encoder import SceneEncoder

    delta = SceneEncoder()("The weather ruined the trip, but my judgement is my own.")
    control = {h.label: h.attrs.get("control") for h in delta.hyperlexemes}
    assert control["weather"] == "outside" and control["judgement"] == "within"
