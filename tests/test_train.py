"""Training (mgpt/train/loop.py): learning, sharding, resume, preemption, multi-host, configs."""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from configs import tiny
from mgpt.train import checkpoint as ckpt_lib
from mgpt.train import config as config_lib
from mgpt.train import mesh as mesh_lib
from mgpt.train import loop as train
from mgpt.errors import UserError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A small TFDS dataset built by data_prep from synthetic piano MIDI files."""
    from data_prep import build, synthetic

    base = tmp_path_factory.mktemp("tiny_dataset")
    midis = base / "midi"
    midis.mkdir()
    for i in range(40):
        (midis / f"p{i:02d}.mid").write_bytes(synthetic.piano_midi(i, num_notes=60 + 5 * i))
    return str(build.build_dataset([f"midi_dir:{midis}"], base / "out", num_workers=1, progress=False,
                                   verbose=False, split_percents=(70, 15, 15), parser="fast"))


def _config(dataset, **train_overrides):
    c = tiny.get_config()
    c.data.dataset_dir = dataset
    c.train.update(train_overrides)
    return c


@pytest.fixture(scope="module")
def tiny_run(dataset, tmp_path_factory):
    """One uninterrupted tiny run, shared by the tests that compare against it."""
    workdir = tmp_path_factory.mktemp("run") / "w"
    return str(workdir), train.train(_config(dataset), str(workdir))


def _cli(*args, env=None, **kw):
    return subprocess.run([sys.executable, "-m", "mgpt.train", *args], cwd=ROOT, capture_output=True, text=True,
                          env=env, timeout=180, **kw)


def test_training_stores_each_styles_control_levels(dataset):
    # A new run with controls fits its levels on the training split and counts each style's segments
    # at each level (the sampler's contrast style); a run trained before them counts the same from
    # the dataset (mgpt.sample.run.Run.count_style_levels).
    from data_prep.vocab import Vocabulary
    from mgpt.train import data as data_lib

    plain = Vocabulary.load(dataset)
    vocab = data_lib.with_controls(plain, dataset, {"control_seconds": 2.0}, resumed=False, log=lambda *_: None)
    counts = vocab.controls["by_style"]
    assert set(counts) <= set(vocab.styles) and counts
    segments = sum(sum(c["density"]) for c in counts.values())
    assert segments > 40 and all(sum(c[name]) == sum(c["density"]) for c in counts.values() for name in c)
    older = plain.with_controls({k: v for k, v in vocab.controls.items() if k != "by_style"})
    assert data_lib.style_level_counts(older, dataset) == counts


def test_loss_falls_on_tiny(tiny_run):
    _, result = tiny_run
    losses = [result["losses"][s] for s in sorted(result["losses"])]
    assert len(losses) == 40
    # From a uniform guess (ln V = 5.8) on random pitches: 0.44 nats in 40 steps since the untied start.
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.3, losses
    assert result["eval"][40] < result["eval"][20], "validation nats/event improve too"


def test_resume_is_bitwise_identical(dataset, tiny_run, tmp_path, monkeypatch):
    _, uninterrupted = tiny_run
    monkeypatch.chdir(tmp_path)  # a relative --workdir, as users type it (orbax wants absolute paths)
    c = _config(dataset, max_steps_per_run=13)
    first = train.train(c, "runs/w")
    assert first["step"] == 13 and ckpt_lib.locate("runs/w")[1] == 13
    c.train.max_steps_per_run = 0
    second = train.train(c, "runs/w")  # the same command again: resumes at 13
    assert min(second["losses"]) == 14
    resumed = {**first["losses"], **second["losses"]}
    assert resumed == uninterrupted["losses"]  # exact float equality, every step
    assert second["eval"] == uninterrupted["eval"]


@pytest.mark.slow
def test_a_muon_run_resumes_bitwise_identical(dataset, tmp_path):
    """Muon's optimizer state (momentum for the hidden matrices, Adam moments for the rest, and the
    placeholders optax leaves where each is absent) checkpoints and restores like AdamW's."""
    c = _config(dataset, steps=16, eval_every=0, optimizer="muon")
    whole = train.train(c, str(tmp_path / "whole"))
    c.train.max_steps_per_run = 7
    first = train.train(c, str(tmp_path / "split"))
    c.train.max_steps_per_run = 0
    second = train.train(c, str(tmp_path / "split"))
    assert first["step"] == 7 and min(second["losses"]) == 8
    assert {**first["losses"], **second["losses"]} == whole["losses"]


def test_trainer_validation_scores_pieces_as_mgpt_evaluate_does():
    """Validation packs several pieces per row; mgpt.evaluate scores each window alone. Same nats."""
    from flax import nnx

    from data_prep.vocab import Vocabulary
    from mgpt.train import data as data_lib
    from mgpt.eval import inputs, likelihood
    from mgpt.model import GPT, ModelConfig

    vocab = Vocabulary(["bach", "folk"])
    rng = np.random.default_rng(0)
    events = np.arange(vocab.note_on_offset, vocab.note_off_offset)
    pieces = [inputs.Piece(rng.choice(events, int(n)).astype(np.int32), style=("bach", "folk")[i % 2])
              for i, n in enumerate(rng.integers(3, 40, 12))]
    seq_len = 32
    model = GPT(ModelConfig(vocab_size=vocab.size, num_layers=2, num_heads=2, d_model=32, mlp_dim=64,
                            max_len=seq_len), rngs=nnx.Rngs(1))
    records = [{"tokens": p.tokens, "style": p.style} for p in pieces]
    batches = data_lib.eval_batches(records, vocab, seq_len=seq_len, batch_size=4, num_batches=8, num_packing_bins=4)
    assert max(len(np.unique(seg[seg > 0])) for b in batches for seg in b["segment_ids"]) > 2, "rows hold pieces"
    graphdef, params = nnx.split(model, nnx.Param)
    eval_step = jax.jit(train.make_eval_step(graphdef))
    sums = [jax.device_get(eval_step(params, b)) for b in batches]
    packed_nats, packed_events = sum(float(x["nats"]) for x in sums), sum(float(x["events"]) for x in sums)

    nats, count = likelihood.model_nats(model, likelihood.windows(pieces, vocab, seq_len), seq_len, len(pieces))
    assert packed_events == count.sum()
    np.testing.assert_allclose(packed_nats / packed_events, nats.sum() / count.sum(), rtol=1e-5)


@pytest.mark.slow
def test_resume_is_bitwise_identical_with_worker_processes(dataset, tmp_path):
    c = _config(dataset, steps=12, eval_every=6)
    c.data.workers = 1
    uninterrupted = train.train(c, str(tmp_path / "whole"))
    c.train.max_steps_per_run = 5
    first = train.train(c, str(tmp_path / "resumed"))
    c.train.max_steps_per_run = 0
    second = train.train(c, str(tmp_path / "resumed"))
    assert {**first["losses"], **second["losses"]} == uninterrupted["losses"]
    assert second["eval"] == uninterrupted["eval"]


def test_training_records_hold_only_tokens_and_style_as_tfds_decodes_them(dataset):
    from mgpt.train import data as data_lib

    lean, full = (data_lib.open_source(dataset, "train", training_only=t) for t in (True, False))
    assert len(lean) == len(full) > 0
    for i in range(len(full)):
        assert set(lean[i]) == {"tokens", "style"}
        np.testing.assert_array_equal(lean[i]["tokens"], full[i]["tokens"])
        assert lean[i]["tokens"].dtype == np.int32
        assert data_lib.record_text(lean[i]["style"]) == data_lib.record_text(full[i]["style"])


@pytest.mark.slow
def test_a_data_position_saved_in_another_layout_starts_the_data_afresh(dataset, tmp_path, capsys):
    c = _config(dataset, steps=6, eval_every=0, max_steps_per_run=3)
    train.train(c, str(tmp_path))
    # As an mgpt from before data shards saved it: one grain state per process.
    (tmp_path / "checkpoints" / "3" / "data" / "process_0-of-1.json").write_text('{"next_index": 5}')
    c.train.max_steps_per_run = 0
    assert train.train(c, str(tmp_path))["step"] == 6
    assert "the data order starts afresh" in capsys.readouterr().out


def test_a_checkpoint_holding_the_old_unused_rng_still_resumes(tmp_path):
    """Runs written before the train state lost its never-read rng saved it: resume drops it."""
    import grain
    import jax.numpy as jnp

    device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    state = {"params": {"w": jnp.arange(3.0)}, "opt_state": {"mu": jnp.ones(3)}, "step": jnp.asarray(7, jnp.int32)}
    checkpoints = ckpt_lib.Checkpoints(tmp_path, async_save=False)
    data = iter(grain.MapDataset.range(4).to_iter_dataset())
    checkpoints.save(7, {**state, "rng": jax.random.PRNGKey(0)}, data, config={}, vocab={})
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=device), state)
    restored, _ = checkpoints.restore(7, abstract, data)
    checkpoints.close()
    assert set(restored) == {"params", "opt_state", "step"} and int(restored["step"]) == 7
    np.testing.assert_array_equal(restored["params"]["w"], state["params"]["w"])


def test_restore_model_for_inference(tiny_run):
    workdir, _ = tiny_run
    model, vocab, config, step = ckpt_lib.restore_model(workdir)
    assert step == 40 and config.model.d_model == 64 and vocab.size > vocab.style_offset
    logits = jax.jit(lambda m, x: m(x))(model, np.full((2, 5), vocab.unknown_style_id, np.int32))
    assert logits.shape == (2, 5, vocab.size) and logits.dtype == np.float32
    earlier, _, _, earlier_step = ckpt_lib.restore_model(f"{workdir}/checkpoints/20")
    assert earlier_step == 20
    assert not np.array_equal(earlier.embed[...], model.embed[...]), "each step's own weights"


@pytest.mark.slow
def test_warm_start_takes_weights_not_optimizer_state(dataset, tiny_run, tmp_path):
    workdir, pretrained = tiny_run
    c = _config(dataset, steps=10, warmup_steps=2, eval_every=0)
    c.init_from = workdir
    tuned = train.train(c, str(tmp_path))
    assert min(tuned["losses"]) == 1, "a fresh run: step counting starts again"
    first_pretrained = pretrained["losses"][1]
    assert tuned["losses"][1] < first_pretrained - 0.3, "starts from the trained weights"


@pytest.mark.slow
def test_a_run_with_tied_embeddings_still_loads_generates_and_resumes(dataset, tmp_path):
    """Runs written before the output was untied hold tied_embeddings=True in config.json."""
    from mgpt.sample import sampler as sample

    c = _config(dataset, steps=6, warmup_steps=1, eval_every=0, checkpoint_every=3, max_steps_per_run=3)
    c.model.tied_embeddings = True
    first = train.train(c, str(tmp_path))
    assert first["step"] == 3
    model, vocab, _, step = ckpt_lib.restore_model(str(tmp_path))
    assert step == 3 and not hasattr(model, "unembed")
    rows = sample.generate_tokens(model, vocab, [np.array([vocab.style_id(None)], np.int32)], seeds=[0], max_events=8)
    assert len(rows[0]) > 1
    today = _config(dataset, steps=6, warmup_steps=1, eval_every=0, checkpoint_every=3)
    with pytest.raises(UserError, match=r"config\.model\.tied_embeddings: False differs .*"
                                        r"resume it with --config\.model\.tied_embeddings=True"):
        train.train(today, str(tmp_path))
    today.model.tied_embeddings = True
    assert train.train(today, str(tmp_path))["step"] == 6


def test_warm_start_from_a_different_model_names_the_fields(dataset, tiny_run, tmp_path):
    workdir, _ = tiny_run
    c = _config(dataset)
    c.init_from = workdir
    c.model.mlp_dim = 96
    with pytest.raises(UserError, match=r"config\.init_from=.*do not fit config\.model \(mlp_dim=128 there, 96 here\)"):
        train.train(c, str(tmp_path))


@pytest.mark.slow
def test_scanned_layers_resume_from_their_own_layout_without_recompiling(dataset, tmp_path):
    c = _config(dataset, steps=4, warmup_steps=1, eval_every=0, checkpoint_every=2, log_every=1)
    c.model.scan_layers = True
    # Every compile goes to the cache here (by default only those over 1 s do).
    previous = jax.config.jax_persistent_cache_min_compile_time_secs
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    try:
        c.train.max_steps_per_run = 2
        train.train(c, str(tmp_path / "w"))
        cache = tmp_path / "w" / "compilation_cache"
        compiled_once = sorted(p.name for p in cache.iterdir())
        c.train.max_steps_per_run = 0
        second = train.train(c, str(tmp_path / "w"))  # a restart: restores the stacked layout
    finally:
        jax.config.update("jax_persistent_cache_min_compile_time_secs", previous)
    train_steps = lambda names: [n for n in names if n.startswith("jit_train_step-")]
    assert len(train_steps(compiled_once)) == 1
    assert train_steps(sorted(p.name for p in cache.iterdir())) == train_steps(compiled_once), "loaded, not compiled"
    assert sorted(second["losses"]) == [3, 4]
    model, _, config, _ = ckpt_lib.restore_model(str(tmp_path / "w"))
    assert config.model.scan_layers and model.blocks.attn.qkv.shape[0] == c.model.num_layers
    # Another layout for the same workdir, or for a warm start from it, is one line naming the field.
    c.model.scan_layers = False
    with pytest.raises(UserError, match=r"^config\.model\.scan_layers: False differs from the run in"):
        train.train(c, str(tmp_path / "w"))
    c.init_from = str(tmp_path / "w")
    with pytest.raises(UserError, match=r"do not fit config\.model \(scan_layers=True there, False here\)$"):
        train.train(c, str(tmp_path / "fresh"))


def test_a_run_written_before_a_model_field_existed_resumes_with_its_default(tmp_path):
    from etils import epath

    c = tiny.get_config()
    written = c.model.to_dict()
    del written["scan_layers"]  # as config.json was before the field existed
    (tmp_path / "config.json").write_text(json.dumps({"model": written}))
    config_lib.check_same_model(epath.Path(tmp_path), c)  # the default: the same unrolled layout
    c.model.scan_layers = True
    with pytest.raises(UserError, match=r"^config\.model\.scan_layers: True differs .* \(False\)"):
        config_lib.check_same_model(epath.Path(tmp_path), c)


def test_a_run_resumes_only_with_the_optimizer_it_started_with(tmp_path):
    """The demo's AdamW runs, written before train.optimizer existed, meet configs/small.py's Muon:
    one line naming the override, not orbax's tree-mismatch traceback."""
    from etils import epath

    from configs import small

    c = small.get_config()
    written = c.to_dict()
    del written["train"]["optimizer"]
    (tmp_path / "config.json").write_text(json.dumps(written))
    with pytest.raises(UserError, match=r"^config\.train\.optimizer: 'muon' differs .* \('adamw'\); resume it with "
                                        r"--config\.train\.optimizer=adamw"):
        config_lib.check_same_model(epath.Path(tmp_path), c)
    c.train.optimizer = "adamw"
    config_lib.check_same_model(epath.Path(tmp_path), c)


def test_non_finite_loss_stops_and_keeps_the_last_good_checkpoint(dataset, tmp_path):
    # lr 0 at step 0 (warmup), then an absurd rate: the update at step 2 overflows.
    c = _config(dataset, learning_rate=1e30, warmup_steps=3, checkpoint_every=1, eval_every=0)
    with pytest.raises(train.NonFiniteLoss, match=r"step 2: non-finite.*Last good checkpoint: step 1"):
        train.train(c, str(tmp_path))
    assert ckpt_lib.locate(tmp_path)[1] == 1


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("train.learning_rate", -1.0, "config.train.learning_rate"),
        ("train.grad_accum", 3, "config.train.grad_accum"),
        ("train.warmup_steps", 40, "config.train.warmup_steps"),
        ("train.optimizer", "sgd", "config.train.optimizer"),
        ("model.num_heads", 3, "config.model.num_heads"),
        ("model.dtype", "float8", "config.model.dtype"),
        ("model.kind", "rnn", "config.model.kind"),
        ("data.seq_len", 128, "config.model.max_len"),
        ("data.transpose", -1, "config.data.transpose"),
        ("data.style_dropout", 1.0, "config.data.style_dropout"),
        ("data.control_seconds", -2.0, "config.data.control_seconds"),
        ("data.control_levels", 1, "config.data.control_levels"),
        ("data.control_dropout", 1.5, "config.data.control_dropout"),
        ("mesh.rules", (("embed", "pipeline"),), "config.mesh.rules"),
    ],
)
def test_config_validation_names_the_field(field, value, message):
    c = tiny.get_config()
    section, name = field.split(".")
    c[section][name] = value
    with pytest.raises(UserError, match=message.replace(".", r"\.")):
        config_lib.validate(c)


_SLURM = {"SLURM_JOB_ID": "42", "SLURM_STEP_NODELIST": "node[1-2]", "SLURM_NTASKS": "2", "SLURM_PROCID": "1",
          "SLURM_LOCALID": "0"}


def _failing_initialize(error):
    def initialize(*args, **kwargs):
        raise error

    return initialize


def test_a_detected_cluster_that_fails_to_connect_stops_instead_of_training_alone(monkeypatch):
    for k, v in _SLURM.items():
        monkeypatch.setenv(k, v)
    assert mesh_lib.cluster_environment() == "SlurmCluster"
    error = jax.errors.JaxRuntimeError("DEADLINE_EXCEEDED: Barrier timed out\nlong coordinator trace")
    monkeypatch.setattr(jax.distributed, "initialize", _failing_initialize(error))
    with pytest.raises(UserError) as e:
        mesh_lib.maybe_initialize_distributed(**tiny.get_config().distributed)
    assert "\n" not in str(e.value) and "SlurmCluster cluster was detected" in str(e.value)
    assert "DEADLINE_EXCEEDED: Barrier timed out" in str(e.value)


def test_auto_without_a_cluster_is_a_single_process_run(monkeypatch):
    for k in _SLURM:
        monkeypatch.delenv(k, raising=False)
    assert mesh_lib.cluster_environment() is None
    monkeypatch.setattr(jax.distributed, "initialize", _failing_initialize(ValueError("coordinator_address should be defined.")))
    mesh_lib.maybe_initialize_distributed(**tiny.get_config().distributed)  # no error: one process


def test_a_validation_split_smaller_than_the_host_count_stops_at_start_up(dataset, tmp_path, monkeypatch):
    from mgpt.train import data as data_lib

    real_open, real_resolve = data_lib.open_source, data_lib.resolve_dataset

    def resolve_as_one_of_two_hosts(dataset_dir):
        # From here on this process believes it is one of two (the mesh and the workdir lock,
        # which talk to the other hosts, are behind it).
        monkeypatch.setattr(jax, "process_count", lambda: 2)
        return real_resolve(dataset_dir)

    monkeypatch.setattr(data_lib, "resolve_dataset", resolve_as_one_of_two_hosts)
    monkeypatch.setattr(data_lib, "open_source",
                        lambda path, split, **kw: [real_open(path, split, **kw)[0]] if split == "validation"
                        else real_open(path, split, **kw))
    with pytest.raises(UserError, match="the validation split has 1 pieces, fewer than the 2 hosts"):
        train.train(_config(dataset), str(tmp_path / "w"))
    assert not (tmp_path / "w" / "checkpoints").exists(), "stopped before any step"


def test_data_shards_that_do_not_split_the_batch_are_named(dataset, tmp_path):
    c = _config(dataset)
    c.data.shards = 3
    with pytest.raises(UserError, match=r"^config.data.shards=3, dataset .*: this host's 8 rows per batch "
                                                r"do not split over its 3 data shards$"):
        train.train(c, str(tmp_path))


def test_mesh_that_does_not_divide_the_devices_is_named():
    c = tiny.get_config()
    c.mesh.fsdp = 3
    with pytest.raises(UserError, match=r"config\.mesh: .*fsdp=3.*devices"):
        config_lib.validate_devices(c, jax.device_count(), 1)


def test_cli_prints_one_line_for_a_bad_config(tmp_path):
    out = _cli("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.train.batch_size=0")
    assert out.returncode == 2  # a user error
    assert out.stderr.strip().splitlines() == ["config.train.batch_size: must be an integer >= 1, got 0"]


def test_a_heard_notes_count_that_is_not_the_vocabularys_is_one_line(dataset, tmp_path):
    out = _cli("--config=configs/tiny.py", f"--workdir={tmp_path}", f"--config.data.dataset_dir={dataset}",
               "--config.model.sounding_pitches=50")
    assert out.returncode == 2
    assert out.stderr.strip().splitlines() == [
        "config.model.sounding_pitches=50, but the dataset's vocabulary has 88 pitches: set it to that, or 0"]
    assert not (tmp_path / "checkpoints").exists()


def test_sigterm_saves_and_exits_zero(dataset, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "mgpt.train", "--config=configs/tiny.py", f"--workdir={tmp_path}",
         f"--config.data.dataset_dir={dataset}", "--config.train.steps=100000", "--config.train.log_every=1",
         "--config.train.eval_every=0", "--config.train.checkpoint_every=100000"],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    lines = []
    for line in proc.stdout:
        lines.append(line)
        if line.startswith("step "):
            proc.send_signal(signal.SIGTERM)
            break
    rest, _ = proc.communicate(timeout=120)
    output = "".join(lines) + rest
    assert proc.returncode == 0, output
    assert "received SIGTERM: saved checkpoint" in output
    saved = ckpt_lib.locate(tmp_path)[1]
    assert 1 <= saved < 100000 and f"checkpoints/{saved}; exiting" in output


# Runs in a subprocess with 8 fake CPU devices; prints one JSON line.
_EIGHT_DEVICES = textwrap.dedent(
    """
    import json, jax, numpy as np
    import ml_collections
    from configs import tiny, large
    from mgpt.train import checkpoint as ckpt_lib
    from mgpt.train import config as config_lib
    from mgpt.train import mesh as mesh_lib
    from mgpt.train import loop as train
    from mgpt.errors import UserError

    out = {}
    c = tiny.get_config()
    table = mesh_lib.rule_table(c.mesh.rules)
    V = 313

    def run(mesh, accum=1):
        c.train.grad_accum = accum
        s = train.setup(c, V, mesh, table)
        state = jax.jit(s.init_fn, static_argnums=0, out_shardings=s.state_shardings)(0)
        step = train.compile_train_step(s, c)
        rng = np.random.default_rng(0)
        losses = []
        for _ in range(3):
            tok = rng.integers(2, V, (8, 65)).astype(np.int32)
            batch = {"inputs": tok[:, :-1], "targets": tok[:, 1:], "mask": (tok[:, 1:] % 7 != 0).astype(np.float32)}
            state, m = step(state, train.global_batch(batch, s.batch_sharding))
            losses.append(float(m["loss"]))
        leaves = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
        specs = sorted({str(x.sharding.spec) for x in jax.tree.leaves(state["params"])})
        return losses, leaves, specs

    one = run(mesh_lib.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1]))
    eight = run(mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}))
    accum = run(mesh_lib.make_mesh({"data": 2, "fsdp": 2, "tensor": 2}), accum=2)
    out["losses_1"], out["losses_8"], out["losses_accum"] = one[0], eight[0], accum[0]
    out["max_param_diff"] = max(float(np.abs(a - b).max()) for a, b in zip(one[1], eight[1]))
    out["specs_8"] = eight[2]

    c.train.grad_accum = 1
    c.train.batch_size = 6
    try:
        config_lib.validate_devices(c, 8, 1)
    except UserError as e:
        out["batch_error"] = str(e)

    big = large.get_config()
    # The settings large's docstring gives for slices smaller than v5e-256: an fsdp mesh over all devices.
    big.model.remat, big.train.grad_accum = "full", 2
    big.mesh.update(data=1, fsdp=-1)
    big.train.batch_size = 8 * big.train.grad_accum  # one row per device per microbatch
    mesh, table = config_lib.validate_devices(big, 8, 1)
    s = train.setup(big, V, mesh, table)
    abstract = ckpt_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
    batch = train.abstract_batch(big.train.batch_size, big.data.seq_len, s.batch_sharding)
    compiled = train.compile_train_step(s, big).lower(abstract, batch).compile()
    out["large_params"] = s.num_params
    out["large_state_bytes_per_device"] = mesh_lib.bytes_per_device(s.abstract_state, s.state_shardings)
    out["large_state_bytes_total"] = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(s.abstract_state))
    mem = compiled.memory_analysis()
    out["large_temp_bytes"] = int(mem.temp_size_in_bytes) if mem is not None else -1
    out["live_arrays"] = len(jax.live_arrays())
    print("RESULT " + json.dumps(out))
    """
)


@pytest.fixture(scope="module")
def eight_devices():
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _EIGHT_DEVICES], cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


@pytest.mark.slow
def test_sharded_step_matches_single_device(eight_devices):
    r = eight_devices
    np.testing.assert_allclose(r["losses_8"], r["losses_1"], rtol=2e-5)
    assert r["max_param_diff"] < 1e-5
    # Parameters really are split over fsdp and tensor (not silently replicated).
    assert any("fsdp" in s for s in r["specs_8"]) and any("tensor" in s for s in r["specs_8"])


@pytest.mark.slow
def test_gradient_accumulation_matches_one_big_batch(eight_devices):
    np.testing.assert_allclose(eight_devices["losses_accum"], eight_devices["losses_8"], rtol=2e-5)


@pytest.mark.slow
def test_batch_that_does_not_divide_the_mesh_is_named(eight_devices):
    assert eight_devices["batch_error"].startswith("config.train.batch_size=6 is not divisible by")


@pytest.mark.slow
def test_large_compiles_on_an_fsdp_mesh_without_allocating(eight_devices):
    r = eight_devices
    per_device, total = r["large_state_bytes_per_device"], r["large_state_bytes_total"]
    print(f"\nlarge.py: {r['large_params']:,} parameters; params + AdamW state {per_device / 2**30:.2f} GiB/device "
          f"of {total / 2**30:.2f} GiB on an 8-way fsdp mesh; step temporaries {r['large_temp_bytes'] / 2**30:.2f} GiB")
    assert 700e6 < r["large_params"] < 900e6
    assert per_device < total / 7.5, "parameters and optimizer state are sharded 8 ways"
    assert r["live_arrays"] < 100, "nothing of the large model was allocated"


@pytest.mark.slow
def test_two_process_distributed_run_and_preemption(dataset, tmp_path):
    """Two jax.distributed CPU processes (gloo) train together; SIGTERM to one of them makes
    both save at the same step and exit 0 (jax's preemption sync point)."""
    with socket.socket() as s:
        s.bind(("localhost", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "mgpt.train", "--config=configs/tiny.py", f"--workdir={tmp_path}",
             f"--config.data.dataset_dir={dataset}", "--config.train.steps=100000", "--config.train.log_every=1",
             "--config.train.eval_every=2", "--config.train.checkpoint_every=100000",
             f"--config.distributed.coordinator_address=localhost:{port}",
             "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        for i in range(2)
    ]
    lines = []
    for line in procs[0].stdout:
        lines.append(line)
        if line.startswith("step      3/"):
            procs[1].send_signal(signal.SIGTERM)
            break
    outputs = ["".join(lines) + procs[0].communicate(timeout=240)[0], procs[1].communicate(timeout=240)[0]]
    for p, out in zip(procs, outputs):
        assert p.returncode == 0, out[-3000:]
    assert "2 process(es)" in outputs[0] and "eval  step      2" in outputs[0]
    saved = ckpt_lib.locate(tmp_path)[1]
    assert saved >= 3 and f"received SIGTERM: saved checkpoint {tmp_path}/checkpoints/{saved}; exiting" in outputs[0]
    data_states = sorted(p.name for p in (tmp_path / "checkpoints" / str(saved) / "data").glob("process_*.json"))
    assert data_states == ["process_0-of-2.json", "process_1-of-2.json"], "each host saves its own data position"

    # The run goes on as one process: it takes over both hosts' data shards.
    resumed = _cli("--config=configs/tiny.py", f"--workdir={tmp_path}", f"--config.data.dataset_dir={dataset}",
                   f"--config.train.steps={saved + 2}", "--config.train.eval_every=0",
                   env={**os.environ, "JAX_PLATFORMS": "cpu"})
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resumed from {tmp_path}/checkpoints/{saved}" in resumed.stdout and "afresh" not in resumed.stdout
    assert "1 process(es)" in resumed.stdout and f"done: step {saved + 2}" in resumed.stdout


_ELASTIC = textwrap.dedent(
    """
    import json, sys
    from configs import tiny
    from mgpt.train import loop as train

    dataset, workdir, data, fsdp, max_steps = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4]), int(sys.argv[5])
    c = tiny.get_config()
    c.data.dataset_dir = dataset
    c.train.update(steps=16, warmup_steps=4, eval_every=8, checkpoint_every=100, max_steps_per_run=max_steps)
    c.mesh.update(data=data, fsdp=fsdp, tensor=1)
    r = train.train(c, workdir)
    print("RESULT " + json.dumps({k: r[k] for k in ("step", "losses", "events", "eval")}))
    """
)


def _elastic_run(dataset, workdir, devices, data, fsdp, max_steps=0):
    env = {**os.environ, "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}", "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", _ELASTIC, dataset, str(workdir), str(data), str(fsdp), str(max_steps)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"mesh: {{'data': {data}, 'fsdp': {fsdp}, 'tensor': 1}} over {devices} cpu devices" in out.stdout
    line = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):]), out.stdout


@pytest.mark.slow
def test_elastic_resume_on_fewer_devices_and_another_mesh(dataset, tmp_path):
    """8 devices (data=2, fsdp=4) stop at step 6; 4 devices (fsdp=4) carry on to 16. Against an
    uninterrupted 8-device run: the same data every step, and the same losses up to float rounding."""
    whole, _ = _elastic_run(dataset, tmp_path / "whole", 8, 2, 4)
    first, _ = _elastic_run(dataset, tmp_path / "elastic", 8, 2, 4, max_steps=6)
    second, log = _elastic_run(dataset, tmp_path / "elastic", 4, 1, 4)
    assert first["step"] == 6 and min(int(s) for s in second["losses"]) == 7 and second["step"] == 16
    assert "starts afresh" not in log
    events = {**first["events"], **second["events"]}
    assert events == whole["events"], "every step saw the batch it would have seen: nothing replayed or skipped"
    losses = {**first["losses"], **second["losses"]}
    np.testing.assert_allclose([losses[s] for s in whole["losses"]], list(whole["losses"].values()), rtol=1e-4)
    np.testing.assert_allclose(second["eval"]["16"], whole["eval"]["16"], rtol=1e-4)
