"""The shared test helpers themselves: a wrong helper hides wrong numbers in every parity test."""

from tests.support import clean_name


def test_clean_name_drops_whole_wrapper_components_only():
    assert clean_name("layers.0._checkpoint_wrapped_module.mlp.up.weight") == "layers.0.mlp.up.weight"
    # hrm_text's module is called L_module: a substring replace of "module." renamed it and broke parity
    name = "model.L_module.layers.0.self_attn.v_proj.weight"
    assert clean_name(name) == name
