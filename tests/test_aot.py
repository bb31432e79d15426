"""mgpt.aot: the trainer's step compiled for a real TPU slice by libtpu, on this CPU machine."""

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from mgpt.train import aot, collectives
from mgpt.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
needs_libtpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None,
    reason="libtpu is not installed (pip install -e '.[tpu]'); .ci/run installs it",
)


@pytest.mark.parametrize(
    "name, chips, topology",
    [("v5e-256", 256, "v5e:16x16"), ("v5e-16", 16, "v5e:4x4"), ("v5e-64", 64, "v5e:8x8"), ("v6e-8", 8, "v6e:2x4"),
     ("v4-8", 4, "v4:2x2x1"), ("v4-32", 16, "v4:2x2x4"), ("v5p-32", 16, "v5p:2x2x4"), ("v4-128", 64, "v4:4x4x4"),
     ("v5e:2x2", 4, "v5e:2x2")],
)
def test_slice_names_users_type_map_to_libtpu_topologies(name, chips, topology):
    s = aot.parse_topology(name)
    assert (s.chips, s.topology_name) == (chips, topology)


@pytest.mark.parametrize("name", ["v3-8", "v4-12", "v4-2", "v5e", "v5e:2x2x2", "tpu-8"])
def test_a_slice_name_that_does_not_exist_is_one_line_naming_the_flag(name):
    with pytest.raises(UserError, match=r"^--topology=") as e:
        aot.parse_topology(name)
    assert "\n" not in str(e.value)


def test_without_libtpu_the_command_says_so_in_one_line(monkeypatch):
    monkeypatch.setattr(aot.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(UserError, match=r"needs libtpu.*pip install -e '\.\[tpu\]'"):
        aot.topology_devices(aot.parse_topology("v5e:2x2"))


def test_without_libtpu_the_command_exits_2_with_one_line_for_all_slices():
    hide_libtpu = (  # None in sys.modules: find_spec answers None and import fails, as without the wheel
        "import runpy, sys\n"
        "sys.modules['libtpu'] = None\n"
        "sys.argv = ['mgpt.aot', *sys.argv[1:]]\n"
        "runpy.run_module('mgpt.aot', run_name='__main__', alter_sys=True)\n"
    )
    r = subprocess.run([sys.executable, "-c", hide_libtpu, "--config=configs/tiny.py", "--topology=v5e:2x2,v4-8"],
                       cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"},
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    assert r.stderr.strip().splitlines() == ["mgpt.aot needs libtpu to compile for TPUs: pip install -e '.[tpu]'"]


def test_the_vocabulary_comes_from_a_build_output_dir_as_the_trainer_finds_it(tmp_path):
    """`make demo` leaves data/music21_demo (a build's output dir, no vocab.json at its top):
    sizing the embedding from it must not glob `**` (etils refuses), and must find the dataset."""
    from data_prep.vocab import Vocabulary
    from configs import tiny

    dataset = tmp_path / "out" / "mgpt_events" / "1.0.0"
    dataset.mkdir(parents=True)
    vocab = Vocabulary(num_velocity_bins=16)
    vocab.save(dataset / "vocab.json")
    (dataset / "dataset_info.json").write_text("{}")
    c = tiny.get_config()
    c.data.dataset_dir = str(tmp_path / "out")
    assert aot._vocab_size(c) == vocab.size != Vocabulary().size
    c.data.dataset_dir = str(tmp_path / "nothing here")
    assert aot._vocab_size(c) == Vocabulary().size  # compiling needs no data


_HLO = """HloModule jit_step

%body (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %p = (s32[], f32[8]) parameter(0)
  %ag = bf16[4,1024]{1,0} all-gather(bf16[1,1024]{1,0} %x), dimensions={0}
  ROOT %t = (s32[], f32[8]) tuple(%i, %v)
}

%cond (p: (s32[], f32[8])) -> pred[] {
  ROOT %c = pred[] compare(%a, %b), direction=LT
}

%body2 (p: (s32[], f32[8])) -> (s32[], f32[8]) {
  %ag2 = bf16[2]{0} all-gather(bf16[1]{0} %y), dimensions={0}
}

%cond2 (p: (s32[], f32[8])) -> pred[] {
  %n = s32[] constant(3)
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %c = pred[] compare(%i, %n), direction=LT
}

ENTRY %main (a: f32[8]) -> f32[8] {
  %w = (s32[], f32[8]) while(%init), condition=%cond, body=%body, backend_config={"known_trip_count":{"n":"16"}}
  %ars = (f32[256]{0}, bf16[64]{0}) all-reduce-start(f32[256]{0} %g, bf16[64]{0} %h), to_apply=%add
  %ags = (bf16[8]{0}, bf16[32]{0}) all-gather-start(bf16[8]{0} %w), dimensions={0}
  %cps = (bf16[4,8]{1,0}, bf16[4,8]{1,0}, u32[]{:S(2)}, u32[]{:S(2)}) collective-permute-start(%w2), source_target_pairs={{0,1},{1,0}}
  %w2 = (s32[], f32[8]) while(%init2), condition=%cond2, body=%body2
  %ard = f32[256]{0} all-reduce-done(f32[256]{0} %ars)
  ROOT %r = f32[8] get-tuple-element(%w), index=1
}
"""


def test_collectives_in_a_loop_count_once_per_iteration():
    found = {k: (t.count, t.nbytes) for k, t in collectives.summarize(aot.collectives_of(_HLO, 4)).items()}
    # Combined all-reduces count every array of their tuple; async ones their outputs only.
    # XLA:TPU gives no known_trip_count: the second loop's is read from its condition, i < 3.
    assert found == {"all-gather": (16 + 1 + 3, 16 * 4 * 1024 * 2 + 32 * 2 + 3 * 2 * 2),
                     "all-reduce": (1, 256 * 4 + 64 * 2), "collective-permute": (1, 4 * 8 * 2)}


def test_an_async_chain_is_one_gather_and_an_all_reduce_into_zeros_is_a_gather():
    """A stored excerpt of large's v5e-256 program (tests/data): the MLP kernel's gather split
    into three fusions sharing a chain_id, the qkv kernel's gathered by an all-reduce of zero
    buffers, a norm scale's gradient all-reduced, all in a 16-layer loop."""
    text = (ROOT / "tests/data/v5e_chain_and_zero_gather.hlo").read_text()
    found = collectives.collectives_of(text, 256)
    totals = collectives.summarize(found)
    mlp_kernel, qkv_third, scale = 2048 * 2 * 5632 * 2, 2048 * 16 * 128 * 2, 2048 * 4
    assert totals["all-gather"] == collectives.Totals(
        count=16 + 16, nbytes=16 * (mlp_kernel + qkv_third),
        # the chain moves a gather's bytes; the gather written as an all-reduce moves an all-reduce's
        moved=16 * (255 / 256 * mlp_kernel + 2 * 255 / 256 * qkv_third), as_all_reduce=16)
    # The gradient shares the gathers' all-reduce but stays a reduction; the loss's runs once.
    assert totals["all-reduce"] == collectives.Totals(count=16 + 1, nbytes=16 * scale + 4,
                                                      moved=2 * 255 / 256 * (16 * scale + 4))
    # Only the chain is asynchronous (it can overlap the matmuls); the all-reduces block.
    assert collectives.moved_bytes(found, asynchronous=True) == 16 * 255 / 256 * mlp_kernel


@pytest.mark.parametrize("text, n, expected", [
    ("replica_groups={{0,1,2,3},{4,5,6,7}}, dimensions={0}", 8, 4),
    ("replica_groups=[2,4]<=[8], dimensions={0}", 8, 4),
    ("replica_groups=[4,2]<=[2,4]T(1,0), to_apply=%add", 8, 2),
    ("replica_groups=mesh['axis_0'=16,'axis_1'=4,'axis_2'=2] {'axis_0','axis_2'}, dimensions={1}", 128, 32),
    ("replica_groups=mesh['axis_0'=4,'axis_1'=1,'axis_2'=1,'axis_3'=64], device_ids=([64,4]T(1,0)) {'axis_0'}, "
     "dimensions={1}", 256, 4),
    ("replica_groups={}, to_apply=%add", 8, 8),
])
def test_replica_group_sizes_in_every_form_xla_writes(text, n, expected):
    assert collectives.group_size(text, n) == expected


def test_ring_formula_bytes_per_op():
    mib = 2**20
    assert collectives.Collective("all-gather", "all-gather", 4, mib, 2).moved == 2 * 3 / 4 * mib
    assert collectives.Collective("reduce-scatter", "reduce-scatter", 4, mib, 1).moved == 3 / 4 * mib
    assert collectives.Collective("all-reduce", "all-reduce", 4, mib, 1).moved == 2 * 3 / 4 * mib
    assert collectives.Collective("all-reduce", "all-reduce", 1, mib, 1).moved == 0
    assert collectives.Collective("collective-permute", "collective-permute", 2, mib, 3).moved == 3 * mib


_KNOWN = """
import os, sys
os.environ.update(TPU_SKIP_MDS_QUERY="1", TPU_ACCELERATOR_TYPE="v5litepod-4", TPU_WORKER_ID="0",
                  TPU_WORKER_HOSTNAMES="localhost", ALLOW_MULTIPLE_LIBTPU_LOAD="1")
import jax, jax.numpy as jnp, numpy as np
jax.config.update("jax_platforms", "cpu")
from jax.experimental import topologies
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
from mgpt.train import collectives
devices = topologies.get_topology_desc(platform="tpu", topology_name="v5e:2x2", chip_config_name="default").devices
mesh = Mesh(np.array(devices), ("x",))

def step(w_RxC, x_BxR):
    def per_chip(w, x):  # w: a quarter of the rows
        def layer(x, _):  # 3 iterations: a gather and a sum each
            full = jax.lax.all_gather(w, "x", tiled=True)  # bf16[512,512]: 512 KiB
            return jax.lax.psum(x @ full, "x"), None  # bf16[64,512] summed: 64 KiB
        return jax.lax.scan(layer, x, None, length=3)[0]
    return jax.shard_map(per_chip, mesh=mesh, in_specs=(P("x", None), P()), out_specs=P())(w_RxC, x_BxR)

w = jax.ShapeDtypeStruct((512, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P("x", None)))
x = jax.ShapeDtypeStruct((64, 512), jnp.bfloat16, sharding=NamedSharding(mesh, P()))
text = jax.jit(step).lower(w, x).compile().as_text()
for k, t in collectives.summarize(collectives.collectives_of(text, 4)).items():
    print(k, t.count, t.nbytes, t.moved)
"""


@needs_libtpu
def test_collectives_known_by_construction_on_a_v5e_slice():
    """Compiled by libtpu for 4 v5e chips: a scan of 3 steps, each gathering a bf16[512,512]
    weight from quarters and summing a bf16[64,512] product over the chips."""
    r = subprocess.run([sys.executable, "-c", _KNOWN], cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stderr[-3000:]
    found = {line.split()[0]: tuple(float(v) for v in line.split()[1:]) for line in r.stdout.splitlines()}
    gathered, summed = 512 * 512 * 2, 64 * 512 * 2
    assert found == {"all-gather": (3, 3 * gathered, 3 * 3 / 4 * gathered),
                     "all-reduce": (3, 3 * summed, 3 * 2 * 3 / 4 * summed)}, r.stdout


def _run(*args, timeout=240, env=None):
    env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run([sys.executable, "-m", "mgpt.aot", *args], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=timeout)


@needs_libtpu
def test_tiny_compiles_for_a_v5e_slice_and_its_flops_match_6n():
    r = _run("--config=configs/tiny.py", "--topology=v5e:2x2", "--config.model.scan_layers=False")
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    print(out)
    assert "4 chips of TPU v5e" in out and "fits:" in out
    # The matmuls counted on the step are exactly 6 N_matmul + attention (no remat in tiny).
    assert re.search(r"matmuls / estimate = 1\.00\)", out), out
    # XLA:TPU's own count of the partitioned step (no loops here): the non-matmul work
    # (softmax, norms, AdamW) is on top, a few per cent at these widths.
    ratio = float(re.search(r"XLA / estimate = ([\d.]+)", out).group(1))
    assert 1.0 <= ratio < 1.25, out
    # Data parallel over 4 chips: the gradients are all-reduced, 2 x 3/4 of them sent per chip.
    assert re.search(r"all-reduce\s+\d+ ", out), out
    model = re.search(r"^step-time model: MFU ([\d.]+) % without overlap, ([\d.]+) % with full overlap "
                      r"\(a model, not a measurement\)$", out, re.M)
    assert model and 0 < float(model.group(1)) <= float(model.group(2)) <= 100, out


def test_matmul_flops_count_each_scanned_layer_and_microbatch():
    import jax

    from configs import tiny
    from mgpt.train import checkpoint as ckpt_lib
    from mgpt.train import config as config_lib
    from mgpt.train import loop as train

    def counted(**model):
        c = tiny.get_config()
        c.model.update(model)
        c.train.grad_accum = 2
        mesh, table = config_lib.validate_devices(c, 1, 1)
        s = train.setup(c, 100, mesh, table)
        state = ckpt_lib.abstract_with_shardings(s.abstract_state, s.state_shardings)
        batch = train.abstract_batch(c.train.batch_size, c.data.seq_len, s.batch_sharding)
        step = train.make_train_step(s.graphdef, s.tx, c.train, s.batch_sharding)
        flops = aot.matmul_flops(jax.make_jaxpr(step)(state, batch))
        tokens = c.train.batch_size * c.data.seq_len
        return flops / (s.model_config.flops_per_token(c.data.seq_len) * tokens)

    assert counted(scan_layers=True) == pytest.approx(1.0, rel=1e-9)
    assert counted(scan_layers=False) == pytest.approx(1.0, rel=1e-9)
    # remat='full' recomputes each block's forward: blocks go from 3 to 4 passes.
    assert 1.2 < counted(scan_layers=True, remat="full") < 1.33


@needs_libtpu
def test_a_config_that_does_not_fit_exits_1_naming_the_chip_and_the_bytes():
    r = _run("--config=configs/tiny.py", "--topology=v5e:2x2", "--config.train.batch_size=1048576")
    assert r.returncode == 1, r.stdout[-2000:] + r.stderr[-2000:]
    line = r.stderr.strip().splitlines()[-1]
    assert re.match(r"does not fit: .* need [\d.]+ GiB of HBM per chip on v5e:2x2, whose TPU v5e chips have "
                    r"15\.75 GiB; try .*grad_accum", line), line


@needs_libtpu
@pytest.mark.slow
def test_the_planner_on_tiny_finishes_fast_its_winner_fits_and_a_second_plan_compiles_nothing(tmp_path):
    env_cache = {"MGPT_AOT_CACHE": str(tmp_path / "cache")}
    args = ("--config=configs/tiny.py", "--topology=v5e:2x2", "--plan", "--plan_max_compiles=2",
            f"--plan_out={tmp_path / 'plan.py'}")
    r = _run(*args, env=env_cache)
    assert r.returncode == 0, r.stderr[-3000:]
    out = r.stdout
    winner = [line for line in out.splitlines() if "**winner**" in line]
    assert len(winner) == 1 and "| compiled **winner** |" in winner[0], out
    fits = re.search(r"HBM ([\d.]+) of ([\d.]+) GiB per chip", out)
    assert fits and float(fits.group(1)) <= 0.9 * float(fits.group(2)), out
    assert re.search(r"^step-time model: MFU [\d.]+ % without overlap", out, re.M), out
    snippet = (tmp_path / "plan.py").read_text()
    assert re.search(r'^c\.model\.remat = "(full|dots|none)"$', snippet, re.M), snippet
    assert re.search(r"^c\.mesh\.update\(data=\d+, fsdp=\d+, tensor=\d+\)$", snippet, re.M), snippet
    # The winner's overrides compile and fit as a plain mgpt.aot run.
    flags = re.search(r"^# As flags: (.*)$", snippet, re.M).group(1).split()
    plain = _run("--config=configs/tiny.py", "--topology=v5e:2x2", *flags)
    assert plain.returncode == 0 and "fits:" in plain.stdout, plain.stderr[-2000:]
    again = _run(*args, env=env_cache)
    assert again.returncode == 0 and "| cached **winner** |" in again.stdout, again.stdout[-2000:]
    assert not re.search(r"\| compiled( \*\*winner\*\*)? \|$", again.stdout, re.M), again.stdout


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5p-128", "v4-128"])
def test_an_fsdp_pair_maps_onto_a_3d_torus(topology):
    """large ships data=-1, fsdp=2; a 4x4x4 torus has no physical axis of 2, which jax refuses to
    split unless asked (mgpt.aot crashed with NotImplementedError on v5p-128)."""
    import ml_collections

    from mgpt.train import mesh as mesh_lib

    devices = aot.topology_devices(aot.parse_topology(topology))
    mesh = mesh_lib.make_mesh(ml_collections.ConfigDict({"data": -1, "fsdp": 2, "tensor": 1}), devices)
    assert dict(mesh.shape) == {"data": 32, "fsdp": 2, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
