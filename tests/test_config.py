import pytest

from hybridctl.core.config import Config, config_from_dict, config_to_toml, load_config, load_config_file
from hybridctl.core.presets import available_presets
from hybridctl.core.errors import ConfigError

# Study A: attention layers and LR per preset (SEEDS: layer lists and learning rates of the original study).
STUDY_A = {
    "deltanet": ([], 1e-3),
    "hybrid_8": ([11], 2e-3),
    "hybrid_sparse": ([3, 6], 2e-3),
    "hybrid_25": ([4, 8, 11], 2e-3),
    "hybrid_late": ([8, 9, 10, 11], 2e-3),
    "hybrid_42": ([2, 4, 6, 8, 11], 2e-3),
    "hybrid_alternating": ([1, 3, 5, 7, 9, 11], 2e-3),
    "hybrid_92": (list(range(1, 12)), 2e-3),
    "transformer": (list(range(12)), 2e-3),
}
STUDY_A_COUNTS = {"hybrid_58": 7, "hybrid_67": 8, "hybrid_75": 9, "hybrid_83": 10}


def test_every_preset_loads():
    names = available_presets()
    assert {"tiny", *STUDY_A, *STUDY_A_COUNTS, "exp7_alternating", "exp7_sparse", "exp7_attention_last", "exp7_rtx4090"} <= set(names)
    for name in names:
        cfg = load_config(name)
        assert len(cfg.model.layer_types()) == cfg.model.n_layers


@pytest.mark.parametrize("name", sorted(STUDY_A))
def test_study_a_presets(name):
    layers, lr = STUDY_A[name]
    cfg = load_config(name)
    m, t = cfg.model, cfg.train
    assert (m.d_model, m.n_layers, m.n_heads) == (768, 12, 12)
    assert (t.seq_len, t.batch_size, t.steps) == (1024, 48, 300)
    assert sorted(m.attention_layers) == layers and t.lr == lr


@pytest.mark.parametrize("name,count", sorted(STUDY_A_COUNTS.items()))
def test_study_a_spread_presets(name, count):
    cfg = load_config(name)
    assert cfg.model.layer_types().count("F") == count


def test_study_b_presets():
    assert load_config("exp7_sparse").model.attention_layers == [3, 7]
    assert load_config("exp7_sparse").model.n_layers == 8
    assert load_config("exp7_rtx4090").model.attention_layers == [3, 7, 11]
    assert load_config("exp7_alternating").model.attention.window == 2048


def test_extends_and_overrides(tmp_path):
    base = tmp_path / "base.toml"
    base.write_text('[model]\nd_model = 64\nn_layers = 3\nn_heads = 4\n[train]\nlr = 0.5\nsteps = 7\n')
    child = tmp_path / "child.toml"
    child.write_text('extends = "base.toml"\n[train]\nsteps = 9\n')
    cfg = load_config(str(child), ["train.lr=1e-3", "model.attention_layers=[0, 2]", 'data.dataset="synthetic:mqar"'])
    assert (cfg.model.d_model, cfg.train.steps, cfg.train.lr) == (64, 9, 1e-3)
    assert cfg.model.layer_types() == ["F", "L", "F"]
    assert cfg.data.dataset == "synthetic:mqar"


def test_extends_by_name_finds_a_preset_beside_the_file_first(tmp_path):
    (tmp_path / "mine.toml").write_text('extends = "tiny"\n[train]\nlr = 0.25\n')  # a user's preset beside it
    (tmp_path / "child.toml").write_text('extends = "mine"\n[train]\nsteps = 9\n')
    cfg = load_config(str(tmp_path / "child.toml"))
    assert (cfg.train.lr, cfg.train.steps) == (0.25, 9)
    assert cfg.model == load_config("tiny").model  # "tiny" is not beside it: the built-in one
    (tmp_path / "tiny.toml").write_text('extends = "tiny"\n[train]\nsteps = 7\n')  # a variant under the same name
    assert load_config(str(tmp_path / "tiny.toml")).train.steps == 7


def test_override_with_a_table_sets_only_its_keys():
    tiny = load_config("tiny")
    cfg = load_config("tiny", ["model.gdn={head_dim=16}"])
    assert cfg.model.gdn.head_dim == 16 and cfg.model.gdn.num_heads == tiny.model.gdn.num_heads
    assert cfg.model.gdn.num_heads != type(tiny.model.gdn)().num_heads  # the preset's value, not the default


def test_override_of_placement_replaces_other_spelling():
    assert load_config("tiny", ["model.attention_layers=[0]"]).model.layer_types() == ["F", "L", "L", "L"]
    assert load_config("hybrid_sparse", ['model.pattern="FLLLLLLLLLLL"']).model.attention_layers == []


def test_resolved_config_round_trips(tmp_path):
    cfg = load_config("hybrid_sparse", ["train.steps=20"])
    path = tmp_path / "config.toml"
    path.write_text(config_to_toml(cfg))
    assert load_config_file(path) == cfg


@pytest.mark.parametrize(
    "overrides,message",
    [
        (["train.stpes=3"], "did you mean 'train.steps'"),
        (["train.steps=-1"], "train.steps must be >= 1"),
        (["train.steps=\"ten\""], "train.steps must be an integer"),
        (["model.attention_layers=[12]"], "out of range"),
        (['model.pattern="LLX"', "model.n_layers=3"], "unknown letter 'X'"),
        (['model.pattern="LLF"'], "has 3 letters but model.n_layers is 4"),
        (["model.attention_layers=[1, 1]"], "repeats a layer"),
        (["nosuchsection.x=1"], "unknown key 'nosuchsection'"),
        (["train.lr"], "has no '='"),
        (["model.d_model=100", "model.n_heads=3"], "divisible"),
        (['model.gdn.backend="triton"'], "must be auto, fused, fla or torch"),
    ],
)
def test_bad_config_values(overrides, message):
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("(", r"\(")):
        load_config("tiny", overrides)


@pytest.mark.parametrize("override, key, meant", [
    ("train.stpes=3", "train.stpes", "train.steps"),  # a typo: the closest dotted key, whole
    ("train.eval_evry=5", "train.eval_evry", "train.eval_every"),
    ("steps=5", "steps", "train.steps"),  # a key without its section: the one section that has it
    ("d_model=64", "d_model", "model.d_model"),
    ("d_modl=64", "d_modl", "model.d_model"),
    ("model.lr=1e-3", "model.lr", "train.lr"),  # a key in the wrong section
    ("model.gdn.headdim=8", "model.gdn.headdim", "model.gdn.head_dim"),
    ("trian.steps=3", "trian", "train"),
])
def test_unknown_key_suggests_the_whole_dotted_key(override, key, meant):
    with pytest.raises(ConfigError) as e:
        load_config("tiny", [override])
    assert str(e.value).startswith(f"unknown key '{key}' (did you mean '{meant}'?); valid keys here: ")


def test_unknown_key_far_from_any_suggests_nothing():
    with pytest.raises(ConfigError) as e:
        load_config("tiny", ["frobnicate=1"])
    assert str(e.value) == "unknown key 'frobnicate'; valid keys here: data, description, model, name, train"


def test_unknown_preset_suggests():
    with pytest.raises(ConfigError, match="did you mean 'hybrid_sparse'"):
        load_config("hybrid_sprase")


def test_bad_toml_names_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text("[train]\nsteps = 3\nlr = = 2\n")
    with pytest.raises(ConfigError, match="line 3"):
        load_config(str(bad))


def test_extends_cycle(tmp_path):
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n')
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "a.toml"))


def test_defaults_are_valid():
    assert config_from_dict({}) == Config()
