"""Generation (mgpt/generate.py, mgpt/render.py): pieces as files, the command line, resume, gallery."""

import dataclasses
import json
import os
import select
import shutil
import subprocess
import sys
import tempfile
import textwrap
import time
import wave

import mido
import note_seq
import numpy as np
import pretty_midi
import pytest

from data_prep.vocab import Vocabulary
from mgpt import generate
from mgpt import render
from mgpt.sample import corpus

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
STYLES = ["bach", "chopin", "folk"]
SMALL = generate.Sampling(max_events=24)


def _save_checkpoint(workdir, vocab, step=7):
    """A run directory as mgpt.train leaves it, holding a randomly initialised tiny GPT."""
    import grain
    import jax.numpy as jnp
    from flax import nnx

    from configs import tiny
    from mgpt.train import checkpoint as ckpt_lib
    from mgpt.model import GPT, ModelConfig

    config = tiny.get_config()
    # max_len 32 < the 60+ events the tests ask for, so the sampler's sliding window runs too.
    config.model.update(num_layers=1, num_heads=2, d_model=32, mlp_dim=64, max_len=32)
    # No dataset beside it: whether a demo dataset happens to exist in the cwd must not matter.
    config.data.dataset_dir = os.path.join(workdir, "no_dataset_here")
    model = GPT(ModelConfig.from_config(config.model, vocab.size), rngs=nnx.Rngs(0))
    ckpts = ckpt_lib.Checkpoints(os.path.join(workdir, "checkpoints"), async_save=False)
    state = {"params": nnx.state(model, nnx.Param), "step": jnp.asarray(step, jnp.int32)}
    ckpts.save(step, state, iter(grain.MapDataset.range(1).to_iter_dataset()), config.to_dict(), vocab.to_json())
    ckpts.wait()
    ckpts.close()


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("run"))
    _save_checkpoint(path, Vocabulary(STYLES))
    return path


@pytest.fixture(scope="module")
def run(workdir):
    return generate.load_run(workdir)


def _primer_file(path, notes):
    from note_seq.protobuf import music_pb2

    ns = music_pb2.NoteSequence()
    ns.tempos.add(qpm=120)
    for pitch, start, end in notes:
        ns.notes.add(pitch=pitch, velocity=90, start_time=start, end_time=end)
    ns.total_time = max(e for _, _, e in notes)
    render.write_midi(ns, path)
    return str(path)


def _cli_args(workdir, out, *extra):
    return ["mgpt.generate", f"--workdir={workdir}", f"--output_dir={out}", "--noprogress", *extra]


# ----------------------------------------------------------------------------- decoding to music


def _check_midi_file(path, ns):
    """The file opens in mido and pretty_midi, holds `ns`'s notes (made playable), all of positive length,
    and never strikes a key that is already sounding."""
    mid = mido.MidiFile(path)
    sounding = {}
    for msg in mido.merge_tracks(mid.tracks):
        if msg.type == "note_on" and msg.velocity > 0:
            assert not sounding.get(msg.note), f"{path}: note {msg.note} struck while it sounds"
            sounding[msg.note] = 1
        elif msg.type in ("note_off", "note_on"):
            assert sounding.get(msg.note), f"{path}: note off for {msg.note} with no note on"
            sounding[msg.note] = 0
    assert not any(sounding.values()), f"{path}: notes left sounding at the end"
    pm = pretty_midi.PrettyMIDI(str(path))
    notes = [n for inst in pm.instruments for n in inst.notes]
    assert len(notes) == len(render.playable(ns).notes)
    assert all(n.end > n.start for n in notes)


def test_garbage_ids_decode_to_valid_midi(tmp_path):
    vocab = Vocabulary(STYLES)
    on, off = vocab.note_on_offset - vocab.min_pitch, vocab.note_off_offset - vocab.min_pitch
    shift = vocab.time_shift_offset + 9  # 100 ms
    crafted = [
        off + 60,  # NOTE_OFF with nothing sounding: dropped
        on + 62, off + 62,  # zero-length note: dropped
        on + 64, shift, off + 64,  # a proper 100 ms note
        on + 67, on + 67, shift, off + 67,  # a repeated NOTE_ON: the first closes, the second dangles
        vocab.style_offset, vocab.pad_id, vocab.eos_id, vocab.size + 5, -3,  # junk in the middle
        on + 71,  # dangling at the end: closed after the last event
    ]
    ns = vocab.decode(crafted)
    got = sorted((n.pitch, round(n.start_time, 3), round(n.end_time, 3)) for n in ns.notes)
    assert got == [(64, 0.0, 0.1), (67, 0.1, 0.2), (67, 0.1, 0.2), (71, 0.2, 0.3)]
    path = render.write_midi(ns, tmp_path / "crafted.mid")
    _check_midi_file(path, ns)
    assert len(pretty_midi.PrettyMIDI(str(path)).instruments[0].notes) == 3, "the two 67s struck together are one"

    rng = np.random.default_rng(0)
    for i in range(20):
        ids = rng.integers(-5, vocab.size + 5, size=int(rng.integers(0, 400)))
        ns = vocab.decode(ids)
        assert all(n.end_time > n.start_time for n in ns.notes)
        _check_midi_file(render.write_midi(ns, tmp_path / f"garbage{i}.mid"), ns)


# ----------------------------------------------------------------------------- inputs users get wrong


def test_style_names_all_lists_and_unconditional():
    vocab = Vocabulary(STYLES)
    assert generate.resolve_styles(vocab, "all") == STYLES
    assert generate.resolve_styles(vocab, " Folk ,bach") == ["folk", "bach"]
    assert generate.resolve_styles(vocab, "unconditional") == ["unconditional"]
    assert generate.style_token(vocab, "unconditional") == vocab.unknown_style_id
    assert generate.resolve_styles(Vocabulary([]), "all") == ["unconditional"]


def test_wrong_style_is_one_line_listing_the_known_styles(workdir, tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "mgpt.generate", f"--workdir={workdir}", f"--output_dir={tmp_path}", "--style=mozart"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode != 0
    assert proc.stderr.strip() == (
        "--style=mozart: not a style of this model; known styles: bach, chopin, folk (or unconditional, or all)"
    )
    assert not os.listdir(tmp_path), "nothing is written when the flags are wrong"


def test_ctrl_c_is_one_line_saying_how_many_pieces_are_kept(workdir, tmp_path):
    import signal

    out = tmp_path / "out"
    args = [sys.executable, "-m", *_cli_args(workdir, out, "--num_samples=400", "--max_events=200", "--batch_size=1",
                                             "--max_copy_seconds=0", "--max_note_seconds=8")]
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True, preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.time() + 120
        while time.time() < deadline and proc.poll() is None and len(render.read_all_manifests(out)) < 2:
            time.sleep(0.05)
        assert proc.poll() is None, proc.communicate()[1][-2000:]
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    done = len(render.read_all_manifests(out))
    lines = [line for line in err.splitlines() if line.strip()]
    assert proc.returncode == 1 and lines == [f"interrupted: {done} of 400 pieces are complete in {out} (its manifest "
                                              "lists them); re-run the same command to write the rest"], err[-2000:]
    assert 2 <= done < 400


def test_corrupt_or_empty_primer_is_a_clear_error(workdir, tmp_path):
    vocab = Vocabulary(STYLES)
    corrupt = tmp_path / "corrupt.mid"
    corrupt.write_bytes(b"MThd\x00\x00\x00\x06\x00\x01\x00\x02\x01\xe0MTrk\xff\xff\xff\xffgarbage")
    with pytest.raises(SystemExit) as e:
        generate.main(_cli_args(workdir, tmp_path / "out", f"--primer={corrupt}"))
    assert str(e.value).startswith(f"--primer={corrupt}: not a readable MIDI file (")
    assert "\n" not in str(e.value)
    with pytest.raises(generate.UserError, match="no such file"):
        generate.load_primer(tmp_path / "missing.mid", vocab)
    late = _primer_file(tmp_path / "late.mid", [(60, 5.0, 6.0)])
    with pytest.raises(generate.UserError, match=r"late.mid: no notes in its first 2 s"):
        generate.load_primer(late, vocab, seconds=2)


def test_bad_sampling_flags_name_the_flag(workdir, tmp_path):
    for flag, message in [("--temperature=0", "--temperature must be > 0"), ("--top_p=1.5", "--top_p must be in"),
                          ("--max_events=0", "--max_events must be >= 1"), ("--guidance=-1", "--guidance must be"),
                          ("--steered_guidance=-1", "--steered_guidance must be"),
                          ("--prefer_style", "--prefer_style chooses among the draws"),
                          ("--max_copy_seconds=-2", "--max_copy_seconds must be >= 0"),
                          ("--copy_tries=0", "--copy_tries must be an integer >= 1")]:
        with pytest.raises(SystemExit, match=message):
            generate.main(_cli_args(workdir, tmp_path, flag))


def test_missing_fluidsynth_fails_at_once_with_the_install_line(workdir, tmp_path, monkeypatch):
    monkeypatch.setattr(render.shutil, "which", lambda name: None)
    monkeypatch.setattr(generate, "load_run", lambda *a: pytest.fail("weights were loaded before the audio check"))
    with pytest.raises(SystemExit) as e:
        generate.main(_cli_args(workdir, tmp_path, "--audio"))
    assert "apt-get install -y fluidsynth timgm6mb-soundfont" in str(e.value)

    monkeypatch.setattr(render.shutil, "which", lambda name: "/usr/bin/fluidsynth")
    monkeypatch.setattr(render, "SOUNDFONT_PATHS", (str(tmp_path / "none.sf2"),))
    with pytest.raises(render.AudioToolsMissing, match="timgm6mb-soundfont, or pass --soundfont"):
        render.find_audio_tools()
    with pytest.raises(render.AudioToolsMissing, match=r"--soundfont=.*nope.sf2: no such file"):
        render.find_audio_tools(tmp_path / "nope.sf2")


# ----------------------------------------------------------------------------- sampling through a run


_ONE_GENERATE = """
import json, sys
from jax import monitoring
from mgpt import generate
events = []
monitoring.register_event_listener(lambda name, **kw: events.append(name))
generate.main(json.loads(sys.argv[1]))
print(json.dumps({k: events.count("/jax/compilation_cache/" + k) for k in ("cache_hits", "cache_misses")}))
"""


@pytest.mark.slow
def test_a_second_generate_on_a_run_loads_its_sampler_from_the_runs_cache(tmp_path):
    workdir = str(tmp_path / "run")
    _save_checkpoint(workdir, Vocabulary(STYLES))

    def start(out):  # a fresh process, as a user's second command is
        args = _cli_args(workdir, tmp_path / out, "--style=bach", "--num_samples=2", "--max_events=40")
        done = subprocess.run([sys.executable, "-c", _ONE_GENERATE, json.dumps([str(a) for a in args])],
                              cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr[-2000:]
        return json.loads(done.stdout.strip().splitlines()[-1])

    first = start("first")
    kept = os.listdir(os.path.join(workdir, "compilation_cache"))
    assert first["cache_misses"] > 0 and len(kept) >= first["cache_misses"], "the first run keeps what it compiled"
    second = start("second")
    assert second == {"cache_hits": first["cache_misses"], "cache_misses": 0}, "every program loaded, none compiled"
    pieces = sorted(n for n in os.listdir(tmp_path / "first") if n.endswith(".mid"))
    assert len(pieces) == 2
    for name in pieces:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "second" / name).read_bytes()
    # An entry cut short (a full disk, a kill mid-write) is dropped and written again, not warned
    # about at every start: jax never rewrites a key whose file exists.
    cache = os.path.join(workdir, "compilation_cache")
    largest = max((n for n in os.listdir(cache) if n.endswith("-cache")), key=lambda n: os.path.getsize(os.path.join(cache, n)))
    whole = open(os.path.join(cache, largest), "rb").read()
    with open(os.path.join(cache, largest), "wb") as f:
        f.write(whole[: len(whole) // 2])
    assert start("third") == {"cache_hits": first["cache_misses"] - 1, "cache_misses": 1}
    from mgpt.train.mesh import drop_unreadable_cache_entries

    assert os.path.exists(os.path.join(cache, largest)) and drop_unreadable_cache_entries(cache) == 0, "written again"
    for name in pieces:
        assert (tmp_path / "first" / name).read_bytes() == (tmp_path / "third" / name).read_bytes()


def test_a_run_whose_cache_cannot_be_kept_is_sampled_without_one_and_leaves_jax_alone(tmp_path, monkeypatch):
    import jax

    from mgpt.sample import run as run_lib

    before = (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs)
    config = {"train": {"compilation_cache": "compilation_cache"}}
    assert run_lib.keep_compiled(str(tmp_path), {"train": {"compilation_cache": ""}}) is None
    assert run_lib.keep_compiled("gs://bucket/run", config) is None  # remote: no object per program
    monkeypatch.setattr(os, "access", lambda *a, **k: False)  # a workdir we may not write
    assert run_lib.keep_compiled(str(tmp_path), config) is None
    monkeypatch.setattr(os, "makedirs", lambda *a, **k: (_ for _ in ()).throw(OSError(30, "Read-only file system")))
    assert run_lib.keep_compiled(str(tmp_path / "elsewhere"), config) is None
    assert (jax.config.jax_compilation_cache_dir, jax.config.jax_persistent_cache_min_compile_time_secs) == before


def test_a_users_own_cache_threshold_stands(tmp_path, monkeypatch):
    import jax

    from mgpt.sample import run as run_lib

    monkeypatch.setenv("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "5")
    before = jax.config.jax_persistent_cache_min_compile_time_secs
    kept = run_lib.keep_compiled(str(tmp_path), {"train": {"compilation_cache": "compilation_cache"}})
    assert kept == os.path.join(str(tmp_path), "compilation_cache")
    assert jax.config.jax_persistent_cache_min_compile_time_secs == before


def test_live_keeps_its_warm_up_in_the_runs_cache(tmp_path, monkeypatch):
    import jax
    import jax.numpy as jnp

    from mgpt.live import __main__ as live_main
    from mgpt.live import stream

    workdir = str(tmp_path / "run")
    _save_checkpoint(workdir, Vocabulary(STYLES))
    served = []
    # The warm-up stands in for the real one (tests/test_live.py runs that): one small program.
    monkeypatch.setattr(stream, "warm_up", lambda run: jax.jit(lambda x: x * 3 + 1)(jnp.arange(7)).block_until_ready())
    monkeypatch.setattr(live_main, "_serve", lambda run, host, port, sessions: served.append(port))
    live_main.main(["mgpt.live", f"--workdir={workdir}", "--port=8799"])
    assert served == [8799]
    assert os.listdir(os.path.join(workdir, "compilation_cache")), "the warm-up's programs are kept for the next start"


def test_primer_is_kept_at_the_start_of_every_piece(run, tmp_path):
    # The last note crosses the 2 s cut (it is shortened to end there); the one at 3 s is left out.
    primer = _primer_file(tmp_path / "primer.mid", [(60, 0.0, 0.5), (64, 0.5, 1.0), (67, 1.0, 2.5), (72, 3.0, 3.5)])
    primer_ids = generate.load_primer(primer, run.vocab, seconds=2.0)
    expected = [(60, 0.0, 0.5), (64, 0.5, 1.0), (67, 1.0, 2.0)]
    p, _, s, e = run.vocab.decode_notes(primer_ids)
    assert list(zip(p.tolist(), s.tolist(), e.tolist())) == expected

    entries = generate.generate_corpus(run, tmp_path / "out", num_samples=2, styles=["bach", "folk"],
                                       sampling=SMALL, primer=primer, primer_seconds=2.0, progress=False)
    for entry in entries:
        assert entry["primer_events"] == len(primer_ids) and entry["new_events"] == 24
        ns = note_seq.midi_file_to_note_sequence(str(tmp_path / "out" / entry["file"]))
        head = sorted((n.pitch, n.start_time, n.end_time) for n in ns.notes if n.start_time < 2.0 - 1e-6)
        assert len(head) == 3
        np.testing.assert_allclose(np.array(head), np.array(expected), atol=0.003)  # MIDI tick rounding
    rows = run.generate_ids("bach", 2, primer=primer, primer_seconds=2.0, max_events=10)
    for row in rows:
        assert row[0] == run.vocab.style_id("bach")
        np.testing.assert_array_equal(row[1 : 1 + len(primer_ids)], primer_ids)


def test_same_seed_same_piece_whatever_the_batch_size(run):
    one_by_one = run.generate_ids("chopin,folk", 2, seed=11, max_events=40, batch_size=1)
    together = run.generate_ids("chopin,folk", 2, seed=11, max_events=40)
    for a, b in zip(one_by_one, together):
        np.testing.assert_array_equal(a, b)
    assert [r[0] for r in together] == [run.vocab.style_id("chopin"), run.vocab.style_id("folk")]
    assert all(len(r) == 41 for r in together), "40 new events each (the sliding window carried on past 32)"
    assert not np.array_equal(together[0][1:], together[1][1:]), "different seeds, different pieces"


def test_notebook_api_returns_note_sequences_and_writes_midi(run, tmp_path):
    assert run.styles == STYLES and run.step == 7
    pieces = run.generate(style="chopin", n=2, seed=3, max_events=30, temperature=0.9, top_k=20, top_p=0.95)
    assert len(pieces) == 2 and all(hasattr(ns, "notes") for ns in pieces)
    paths = run.write_midi(pieces, tmp_path, prefix="chopin", images=True)
    assert [p.name for p in paths] == ["chopin_000.mid", "chopin_001.mid"]
    for ns, path in zip(pieces, paths):
        _check_midi_file(path, ns)
        assert path.with_suffix(".png").stat().st_size > 1000


# ----------------------------------------------------------------------------- batch corpus generation


def test_killed_batch_generation_resumes_without_duplicates(run, tmp_path, monkeypatch):
    # The batched path (continuous=False): its groups go through run.sample_ids, counted below. The
    # continuous path's kill is tests/test_occupancy.py::test_killed_rolling_corpus_resumes_byte_identical.
    opts = dict(num_samples=6, styles=["bach", "folk"], seed=5, sampling=SMALL, batch_size=2, progress=False,
                continuous=False)
    uninterrupted = generate.generate_corpus(run, tmp_path / "whole", **opts)

    out = tmp_path / "killed"
    real_write, written = generate._write_piece, []

    def write_then_die(*args, **kwargs):
        entry = real_write(*args, **kwargs)
        written.append(entry["index"])
        if len(written) == 4:  # killed after piece 3's files, before its manifest line
            raise KeyboardInterrupt
        return entry

    monkeypatch.setattr(corpus, "_write_piece", write_then_die)
    with pytest.raises(KeyboardInterrupt):
        generate.generate_corpus(run, out, **opts)
    monkeypatch.setattr(corpus, "_write_piece", real_write)
    with open(out / "manifest.jsonl", "a") as f:
        f.write('{"index": 3, "file": "00003_fo')  # and a line cut short mid-write
    assert [e["index"] for e in render.read_manifest(out / "manifest.jsonl")] == [0, 1, 2]

    sampled = []
    real_sample = run.sample_ids
    monkeypatch.setattr(run, "sample_ids", lambda prompts, *a, **k: sampled.extend(prompts) or real_sample(prompts, *a, **k))
    resumed = generate.generate_corpus(run, out, **opts)
    assert len(sampled) == 3, "only the missing pieces are generated again"
    lines = render.read_manifest(out / "manifest.jsonl")
    assert sorted(e["index"] for e in lines) == list(range(6)), "every piece once"
    assert [e["index"] for e in resumed] == list(range(6))
    for a, b in zip(uninterrupted, sorted(lines, key=lambda e: e["index"])):
        assert (tmp_path / "whole" / a["file"]).read_bytes() == (out / b["file"]).read_bytes()
        assert a == b

    with pytest.raises(generate.UserError, match=r"piece 0 was made with settings=.*new --output_dir"):
        generate.generate_corpus(run, out, **{**opts, "sampling": generate.Sampling(max_events=25)})


def test_each_host_writes_its_share_and_the_gallery_joins_them(run, tmp_path):
    out = tmp_path / "pod"
    for host in (1, 0):
        entries = generate.generate_corpus(run, out, num_samples=5, styles=["folk"], sampling=SMALL, batch_size=2,
                                           progress=False, process_index=host, process_count=2)
        assert [e["index"] for e in entries] == list(range(host, 5, 2))
    assert sorted(p.name for p in out.glob("manifest*")) == ["manifest-00000-of-00002.jsonl",
                                                             "manifest-00001-of-00002.jsonl"]
    page = generate.write_gallery(out).read_text()
    assert all(f"0000{i}_folk.png" in page for i in range(5))


MULTI_DEVICE = textwrap.dedent("""
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=2"
    import jax, numpy as np
    from flax import nnx
    from data_prep.vocab import Vocabulary
    from mgpt import generate
    from mgpt.model import GPT, ModelConfig
    vocab = Vocabulary(["bach", "chopin"])
    cfg = ModelConfig(vocab_size=vocab.size, num_layers=1, num_heads=2, d_model=32, mlp_dim=64, max_len=32)
    run = generate.Run(model=GPT(cfg, rngs=nnx.Rngs(0)), vocab=vocab)
    prompts = run.prompts(["bach", "chopin", "bach", "unconditional"])
    sampling = generate.Sampling(max_events=40)
    spread = run.sample_ids(prompts, [1, 2, 3, 4], sampling, devices=jax.local_devices())
    alone = run.sample_ids(prompts, [1, 2, 3, 4], sampling, batch_size=2, devices=jax.local_devices()[:1])
    assert len(jax.local_devices()) == 2 and list(run._replicas) == [1], "weights copied to the second device only"
    assert all(np.array_equal(a, b) for a, b in zip(spread, alone)), "pieces differ across device counts"
    print("ok")
""")


@pytest.mark.slow
def test_pieces_do_not_depend_on_the_number_of_devices():
    proc = subprocess.run([sys.executable, "-c", MULTI_DEVICE], cwd=ROOT, capture_output=True, text=True,
                          timeout=180)
    assert proc.returncode == 0 and proc.stdout.strip() == "ok", proc.stderr[-2000:]


# ----------------------------------------------------------------------------- the command's outputs


@pytest.fixture(scope="module")
def cli_output(workdir, tmp_path_factory):
    """One run of the command over every style, with audio when FluidSynth is installed."""
    out = tmp_path_factory.mktemp("cli") / "out"
    audio = ["--audio"] if _have_audio() else []
    generate.main(_cli_args(workdir, out, "--style=all", "--num_samples=4", "--max_events=60", "--top_p=0.95",
                            "--seed=100", *audio))
    return out


def _have_audio():
    try:
        render.find_audio_tools()
        return True
    except render.AudioToolsMissing:
        return False


def test_command_writes_midi_manifest_images_and_gallery(cli_output):
    entries = render.read_manifest(cli_output / "manifest.jsonl")  # in the order the pieces finished
    entries = sorted(entries, key=lambda e: e["index"])
    assert [(e["file"], e["style"], e["seed"]) for e in entries] == [
        ("00000_bach.mid", "bach", 100), ("00001_chopin.mid", "chopin", 101),
        ("00002_folk.mid", "folk", 102), ("00003_bach.mid", "bach", 103)]
    for e in entries:
        assert e["settings"]["top_p"] == 0.95 and e["settings"]["max_events"] == 60 and e["checkpoint_step"] == 7
        assert 0 < e["events"] <= 60 and e["seconds"] > 0  # an untrained model may draw EOS early
        ns = note_seq.midi_file_to_note_sequence(str(cli_output / e["file"]))
        _check_midi_file(cli_output / e["file"], ns)
        assert e["notes"] == len(ns.notes) and e["seconds"] == pytest.approx(ns.total_time, abs=0.01)
        assert (cli_output / e["image"]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    page = (cli_output / "index.html").read_text()
    assert "http" not in page, "the gallery needs no network"
    assert all(f'href="{e["file"]}" download' in page for e in entries)


def test_audio_is_rendered_when_fluidsynth_exists(cli_output):
    if not _have_audio():
        pytest.skip(f"fluidsynth or a GM soundfont is not installed ({render.INSTALL_AUDIO})")
    for e in render.read_manifest(cli_output / "manifest.jsonl"):
        with wave.open(str(cli_output / e["audio"])) as w:
            seconds = w.getnframes() / w.getframerate()
            assert w.getnchannels() == 2 and w.getframerate() == render.SAMPLE_RATE
            assert np.abs(np.frombuffer(w.readframes(w.getnframes()), np.int16)).max() > 0, "not silence"
        assert e["seconds"] <= seconds <= e["seconds"] + 2  # the release of the last notes, no long silence


def test_a_pile_of_struck_notes_still_renders_promptly(tmp_path):
    if not _have_audio():
        pytest.skip(f"fluidsynth or a GM soundfont is not installed ({render.INSTALL_AUDIO})")
    vocab = Vocabulary([])
    on = vocab.note_on_offset - vocab.min_pitch
    # Hundreds of NOTE_ONs on a few keys at one instant: written raw, FluidSynth's queue overflows and it renders forever.
    ids = [on + 46] * 300 + [on + 50] * 300 + [vocab.time_shift_offset + 99] * 3
    path = render.write_midi(vocab.decode(ids), tmp_path / "pile.mid")
    start = time.monotonic()
    wav = render.render_audio(path, tmp_path / "pile.wav")
    assert time.monotonic() - start < 30
    with wave.open(str(wav)) as w:
        assert 0.5 < w.getnframes() / w.getframerate() < 10


class _Chromium:
    """Headless Chromium driven over the DevTools protocol on a pipe (fds 3/4): no extra packages."""

    def __init__(self, exe):
        cmd_r, self._cmd_w = os.pipe()
        self._evt_r, evt_w = os.pipe()
        self._profile = tempfile.mkdtemp()

        # bash puts the pipe ends on fds 3 and 4, where --remote-debugging-pipe expects them (no preexec_fn:
        # forking a process that runs JAX threads is unsafe).
        redirect = f'exec "$0" "$@" 3<&{cmd_r} 4>&{evt_w} {cmd_r}<&- {evt_w}>&-'
        self._proc = subprocess.Popen(
            [shutil.which("bash") or "/bin/bash", "-c", redirect, exe, "--headless=new", "--no-sandbox",
             "--disable-gpu", "--no-first-run", "--remote-debugging-pipe", f"--user-data-dir={self._profile}",
             "about:blank"],
            pass_fds=(cmd_r, evt_w), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        os.close(cmd_r)
        os.close(evt_w)
        self._buf, self._id, self.events = b"", 0, []

    def send(self, method, params=None, session=None, timeout=60):
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}, **({"sessionId": session} if session else {})}
        os.write(self._cmd_w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            m = self._read(deadline)
            if m.get("id") == self._id:
                assert "error" not in m, f"{method}: {m['error']}"
                return m["result"]
            self.events.append(m)

    def wait_for(self, method, timeout=60):
        deadline = time.monotonic() + timeout
        while not any(e.get("method") == method for e in self.events):
            self.events.append(self._read(deadline))

    def _read(self, deadline):
        while b"\0" not in self._buf:
            ready, _, _ = select.select([self._evt_r], [], [], max(0.0, deadline - time.monotonic()))
            assert ready, "chromium stopped answering"
            chunk = os.read(self._evt_r, 1 << 16)
            assert chunk, "chromium exited"
            self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def close(self):
        try:
            self.send("Browser.close", timeout=5)
            self._proc.wait(10)
        except Exception:
            self._proc.kill()
            self._proc.wait()
        os.close(self._cmd_w)
        os.close(self._evt_r)
        shutil.rmtree(self._profile, ignore_errors=True)


def test_gallery_loads_in_headless_chromium_and_shows_every_image(cli_output):
    exe = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    if exe is None:
        pytest.skip("Chromium is not installed (apt-get install -y chromium)")
    entries = render.read_manifest(cli_output / "manifest.jsonl")
    browser = _Chromium(exe)
    try:
        target = browser.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = browser.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            browser.send(f"{domain}.enable", session=session)
        browser.send("Page.navigate", {"url": (cli_output / "index.html").as_uri()}, session=session)
        browser.wait_for("Page.loadEventFired")
        # Lazy images load when scrolled to: ask for each one now and wait until it is decoded.
        check = """Promise.all([
            ...[...document.images].map(i => { i.loading = 'eager';
                return i.decode().then(() => [i.getAttribute('src'), i.naturalWidth], () => [i.getAttribute('src'), 0]); }),
            ...[...document.querySelectorAll('audio')].map(a => new Promise(done => {
                a.onloadedmetadata = () => done([a.getAttribute('src'), a.duration]);
                a.onerror = () => done([a.getAttribute('src'), 0]);
                a.preload = 'metadata'; a.load(); })),
        ]).then(JSON.stringify)"""
        loaded = json.loads(browser.send("Runtime.evaluate", {"expression": check, "awaitPromise": True,
                                                               "returnByValue": True}, session=session)["result"]["value"])
        browser.send("Runtime.evaluate", {"expression": "0"}, session=session)  # flush late console events
    finally:
        browser.close()
    errors = [e["params"] for e in browser.events
              if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert not errors, errors
    images = {src: size for src, size in loaded if src.endswith(".png")}
    assert images.keys() == {e["image"] for e in entries} and all(w > 0 for w in images.values()), loaded
    audio = {src: seconds for src, seconds in loaded if src.endswith(".wav")}
    assert audio.keys() == {e["audio"] for e in entries if e["audio"]}
    assert all(s > 0 for s in audio.values()), loaded


def test_note_length_guard_defaults_to_the_styles_training_notes(run, capsys):
    table = {"all": {generate.NOTE_GUARD_PERCENTILE: 3.0}, STYLES[0]: {generate.NOTE_GUARD_PERCENTILE: 1.5}}
    guarded = dataclasses.replace(run, note_seconds=table)
    bach = np.asarray([guarded.vocab.style_id(STYLES[0])])
    other = np.asarray([guarded.vocab.style_id(STYLES[1])])
    unconditional = np.asarray([guarded.vocab.unknown_style_id])
    default = generate.Sampling()
    assert guarded.max_note_seconds(bach, default) == 1.5
    assert guarded.max_note_seconds(other, default) == 3.0  # a style without a row takes 'all'
    assert guarded.max_note_seconds(unconditional, default) == 3.0
    assert guarded.max_note_seconds(bach, generate.Sampling(max_note_seconds=0)) == 0.0  # off
    # No table (the dataset is not on this machine): the fallback, said once per style, not per piece.
    capsys.readouterr()
    bare = dataclasses.replace(run, note_seconds={})
    assert bare.max_note_seconds(bach, default) == generate.FALLBACK_MAX_NOTE_SECONDS
    assert bare.max_note_seconds(bach, default) == generate.FALLBACK_MAX_NOTE_SECONDS
    said = [line for line in capsys.readouterr().err.splitlines() if "note-length guard" in line]
    assert len(said) == 1 and STYLES[0] in said[0] and "--max_note_seconds" in said[0]
    # A hand-edited or older build.json whose row lacks the percentile falls back instead of a KeyError.
    odd = dataclasses.replace(run, note_seconds={STYLES[0]: {"p50": 0.4}, "all": {"p50": 0.5}})
    assert odd.max_note_seconds(bach, default) == generate.FALLBACK_MAX_NOTE_SECONDS
    with pytest.raises(generate.UserError, match="--max_note_seconds"):
        generate.Sampling(max_note_seconds=-1)


# ----------------------------------------------------------------------------- the copy guard


@pytest.fixture(scope="module")
def train_set(tmp_path_factory):
    """A small dataset (every piece in train) and one of its pieces to plant: (dataset path, tokens, piece id)."""
    from data_prep import build, synthetic
    from mgpt.train import data as data_lib

    folder = tmp_path_factory.mktemp("train_midi")
    for seed in range(6):
        (folder / f"piece{seed}.mid").write_bytes(synthetic.piano_midi(seed, num_notes=60, tempo_changes=False))
    path = build.build_dataset([f"midi_dir:{folder}"], tmp_path_factory.mktemp("train_ds"), num_workers=1,
                               progress=False, verbose=False, split_percents=(100, 0, 0))
    record = data_lib.open_source(path, "train")[3]
    return path, np.asarray(record["tokens"], np.int32), data_lib.record_text(record["piece_id"])


def _original_piece(vocab, notes=40):
    """Repeated C4s 0.29 s apart: no training piece (random pitches) has two such steps in a row."""
    pitch = np.full(notes, 60)
    start = 0.29 * np.arange(notes)
    return vocab.encode_notes(pitch, np.full(notes, 80), start, start + 0.2)


def _forced_sampler(vocab, planted, copy_seeds, calls):
    """Run.sample_ids as a model forced to copy: seeds in `copy_seeds` play the planted training
    piece (transposed up a tone, which the search must see through), others an original piece."""
    copy = vocab.transpose(planted, 2)
    original = _original_piece(vocab)

    def sample_ids(prompts, seeds, sampling=None, **kwargs):
        calls.append([int(s) for s in seeds])
        return [np.concatenate([p[:1], copy if s in copy_seeds else original]).astype(np.int32)
                for p, s in zip(prompts, seeds)]

    return sample_ids


def test_copy_guard_redraws_a_piece_that_copies_a_training_span_and_records_provenance(
        run, train_set, tmp_path, monkeypatch, capsys):
    dataset, planted, planted_id = train_set
    guarded = dataclasses.replace(run, dataset_dir=str(dataset))
    planted_s = float(np.ptp(guarded.vocab.decode_notes(planted)[2]))
    assert planted_s > 3.0, "the planted piece must be longer than the limit"
    calls = []
    monkeypatch.setattr(guarded, "sample_ids", _forced_sampler(guarded.vocab, planted, {10}, calls))
    entries = generate.generate_corpus(guarded, tmp_path, num_samples=2, styles=["bach"], seed=10, sampling=SMALL,
                                       progress=False, max_copy_seconds=3.0, copy_tries=3, continuous=False)
    first, second = entries
    # Piece 0 (seed 10) copied: re-drawn once with a new seed, which came out original.
    assert calls[0] == [10, 11] and calls[1] == [generate.redraw_seed(10, 1)] and len(calls) == 2
    assert [t["seed"] for t in first["copy_tries"]] == [10, generate.redraw_seed(10, 1)]
    copied = first["copy_tries"][0]
    assert copied["train_piece_id"] == planted_id and copied["seconds"] >= 3.0
    assert first["drawn_seed"] == generate.redraw_seed(10, 1) and first["seed"] == 10
    assert first["copy"]["seconds"] < 1.0 and not first["copy_over_limit"]
    assert len(second["copy_tries"]) == 1 and second["drawn_seed"] == 11 and not second["copy_over_limit"]
    # The written file is the kept (original) draw.
    notes = note_seq.midi_file_to_note_sequence(str(tmp_path / first["file"])).notes
    assert {n.pitch for n in notes} == {60}
    err = capsys.readouterr().err
    assert f"copies {copied['seconds']:.2f} s" in err and planted_id in err and "try 2 of 3" in err
    assert "longest copy" in generate.write_gallery(tmp_path).read_text()


def test_copy_guard_marks_a_piece_that_copies_on_every_try(run, train_set, tmp_path, monkeypatch):
    dataset, planted, planted_id = train_set
    guarded = dataclasses.replace(run, dataset_dir=str(dataset))
    calls = []
    always = {10, *(generate.redraw_seed(10, a) for a in range(1, 3))}
    monkeypatch.setattr(guarded, "sample_ids", _forced_sampler(guarded.vocab, planted, always, calls))
    (entry,) = generate.generate_corpus(guarded, tmp_path, num_samples=1, styles=["bach"], seed=10, sampling=SMALL,
                                        progress=False, max_copy_seconds=3.0, copy_tries=3, continuous=False)
    assert len(calls) == 3 and len(entry["copy_tries"]) == 3
    assert entry["copy_over_limit"] and entry["copy"]["train_piece_id"] == planted_id
    assert entry["copy"]["seconds"] >= 3.0 and entry["copy"]["notes"] > 10
    gallery = generate.write_gallery(tmp_path).read_text()
    assert planted_id in gallery and "OVER THE LIMIT" in gallery


def test_copy_index_is_built_once_and_cached_beside_the_dataset(run, train_set, monkeypatch):
    from mgpt.music import originality

    dataset, planted, planted_id = train_set
    (dataset / originality.INDEX_FILE).unlink(missing_ok=True)
    built, ids = originality.training_index(dataset, run.vocab)
    assert (dataset / originality.INDEX_FILE).is_file() and planted_id in ids
    with np.load(dataset / originality.INDEX_FILE, allow_pickle=False) as z:  # plain arrays, no pickle
        assert set(z.files) >= {"codes", "sa", "owner", "piece_ids", "fingerprint"}
    monkeypatch.setattr(originality.CopyIndex, "__init__", lambda *a: pytest.fail("the cached index was rebuilt"))
    cached, cached_ids = originality.training_index(dataset, run.vocab)
    assert cached_ids == ids
    notes = run.vocab.decode_notes(run.vocab.transpose(planted, -3))
    assert cached.longest_copy(notes)[0] == built.longest_copy(notes)[0]
    monkeypatch.undo()
    (dataset / originality.INDEX_FILE).write_bytes(b"cut short")  # a damaged cache is rebuilt, not trusted
    again, _ = originality.training_index(dataset, run.vocab)
    assert again.longest_copy(notes)[0] == built.longest_copy(notes)[0]


def test_resume_refuses_pieces_made_with_another_note_limit(run, tmp_path):
    # The default limit comes from the dataset: a resume where it resolves differently must not mix pieces.
    opts = dict(num_samples=2, styles=[STYLES[0]], progress=False, sampling=generate.Sampling(max_events=10))
    generate.generate_corpus(run, tmp_path, **opts)
    other = dataclasses.replace(run, note_seconds={"all": {generate.NOTE_GUARD_PERCENTILE: 1.25}})
    generate.generate_corpus(run, tmp_path, **opts)  # same limit: resumes (nothing to do)
    with pytest.raises(generate.UserError, match="max_note_seconds"):
        generate.generate_corpus(other, tmp_path, **opts)


@pytest.mark.slow
def test_a_model_trained_with_style_dropout_samples_with_guidance_by_default(tmp_path):
    """Such a model knows STYLE:unknown, so guidance is its default (DEFAULT_GUIDANCE) and the
    manifest records the G used; any other model samples plainly (G = 1), as asking for 1 does."""
    import ml_collections
    from flax import nnx

    from mgpt.model import GPT, ModelConfig

    vocab = Vocabulary(["bach", "chopin"])
    model = GPT(ModelConfig(vocab_size=vocab.size, num_layers=1, num_heads=2, d_model=32, mlp_dim=64, max_len=32),
                rngs=nnx.Rngs(0))

    def run(dropout):
        config = ml_collections.ConfigDict({"data": {"style_dropout": dropout}})
        return generate.Run(model=model, vocab=vocab, config=config)

    sampling = generate.Sampling(max_events=24, max_note_seconds=0)
    assert run(0.1).sampling(sampling).guidance == generate.DEFAULT_GUIDANCE != 1.0
    assert run(0.0).sampling(sampling).guidance == 1.0
    assert run(0.1).sampling(dataclasses.replace(sampling, guidance=1.0)).guidance == 1.0  # an explicit G stays
    prompts = run(0.1).prompts(["bach", "chopin"])
    guided = run(0.1).sample_ids(prompts, [0, 1], sampling)
    assert all(np.array_equal(a, b) for a, b in
               zip(guided, run(0.0).sample_ids(prompts, [0, 1], dataclasses.replace(sampling, guidance=generate.DEFAULT_GUIDANCE))))
    plain = run(0.0).sample_ids(prompts, [0, 1], sampling)
    assert all(np.array_equal(a, b) for a, b in
               zip(plain, run(0.1).sample_ids(prompts, [0, 1], dataclasses.replace(sampling, guidance=1.0))))
    entries = generate.generate_corpus(run(0.1), tmp_path, num_samples=2, styles=["bach"], sampling=sampling,
                                       progress=False, max_copy_seconds=0)
    assert [e["settings"]["guidance"] for e in entries] == [generate.DEFAULT_GUIDANCE] * 2
    # Unconditional pieces have no style to guide towards: plain sampling, recorded as such.
    assert run(0.1).sampling(sampling, run(0.1).prompts(["unconditional"] * 2)).guidance == 1.0
    # A corpus begun with G = 1 (before guidance was the default) resumes with the default flags.
    old = tmp_path / "old"
    plain_entries = generate.generate_corpus(run(0.1), old, num_samples=1, styles=["bach"], seed=5, progress=False,
                                             sampling=dataclasses.replace(sampling, guidance=1.0), max_copy_seconds=0)
    resumed = generate.generate_corpus(run(0.1), old, num_samples=2, styles=["bach"], seed=5, sampling=sampling,
                                       progress=False, max_copy_seconds=0)
    assert [e["settings"]["guidance"] for e in resumed] == [1.0, 1.0] and resumed[0] == plain_entries[0]


def test_the_steered_guidance_reaches_the_sampler_and_the_manifest(tmp_path, monkeypatch):
    from mgpt.sample import sampler

    seen = []
    prepare = sampler.prepare

    def spy(*args, **kwargs):  # what the sampler's job keeps
        job = prepare(*args, **kwargs)
        seen.append(job.steered_guidance)
        return job

    monkeypatch.setattr(sampler, "prepare", spy)
    vocab = Vocabulary(["bach"]).with_controls(
        {"seconds": 0.5, "levels": 8, "edges": {n: [float(i) for i in range(1, 8)] for n in ("density", "polyphony",
                                                                                          "register", "loudness")}})
    from flax import nnx

    from mgpt.model import GPT, ModelConfig

    model = GPT(ModelConfig(vocab_size=vocab.size, num_layers=1, num_heads=2, d_model=32, mlp_dim=64, max_len=32),
                rngs=nnx.Rngs(0))
    run = generate.Run(model=model, vocab=vocab, config=None)
    steered = generate.Sampling(max_events=8, max_note_seconds=0, guidance=1.5, controls="density=2",
                                steered_guidance=2)
    entries = generate.generate_corpus(run, tmp_path / "a", num_samples=1, styles=["bach"], sampling=steered,
                                       progress=False, max_copy_seconds=0)
    assert seen[-1] == 2.0 and entries[0]["settings"]["steered_guidance"] == 2.0
    plain = dataclasses.replace(steered, controls=None)  # nothing steered: recorded as off, as older manifests read
    entries = generate.generate_corpus(run, tmp_path / "b", num_samples=1, styles=["bach"], sampling=plain,
                                       progress=False, max_copy_seconds=0)
    assert entries[0]["settings"]["steered_guidance"] is None
    assert generate.Sampling(controls="density=2").steered_guidance is None  # off unless asked for
    with pytest.raises(generate.UserError, match="--steered_guidance needs style guidance"):  # G = 1: one line
        generate.generate_corpus(run, tmp_path / "c", num_samples=1, styles=["bach"], progress=False,
                                 sampling=dataclasses.replace(steered, guidance=1.0), max_copy_seconds=0)


def test_bad_hard_limit_flags_name_the_flag(workdir, tmp_path):
    for flag, message in [("--pitch_range=high", "--pitch_range=high: expected LO-HI"),
                          ("--pitch_range=72-48", "--pitch_range must be LO-HI"),
                          ("--velocity_range=0-90", "--velocity_range must be LO-HI with 1 <= LO"),
                          ("--max_polyphony=0", "--max_polyphony must be an integer >= 1"),
                          ("--pitch_range=0-5", "--pitch_range 0-5 holds none of the model's pitches")]:
        with pytest.raises(SystemExit, match=message) as e:
            generate.main(_cli_args(workdir, tmp_path, flag))
        assert "\n" not in str(e.value)


def test_hard_limits_reach_the_sampler_and_the_manifest(run, tmp_path):
    from mgpt.sample.corpus import generate_corpus

    lines = generate_corpus(run, tmp_path, num_samples=3, styles=["unconditional"], progress=False,
                            max_copy_seconds=0, sampling=generate.Sampling(max_events=60, pitch_range="60-64",
                                                                           max_polyphony=1))
    notes = [run.vocab.decode_notes(ids) for ids in run.generate_ids(n=3, max_events=60, pitch_range=(60, 64),
                                                                     max_polyphony=1)]
    assert sum(len(n.pitch) for n in notes) > 0
    for n in notes:
        assert np.all((n.pitch >= 60) & (n.pitch <= 64))
    assert lines[0]["settings"]["pitch_range"] == [60, 64] and lines[0]["settings"]["max_polyphony"] == 1
    # Resuming with the same flags is the same corpus.
    generate_corpus(run, tmp_path, num_samples=3, styles=["unconditional"], progress=False, max_copy_seconds=0,
                    sampling=generate.Sampling(max_events=60, pitch_range="60-64", max_polyphony=1))


def test_controls_on_a_model_without_them_is_one_line(workdir, tmp_path):
    for flag, message in [("--controls=density=3", "--controls: this model was trained without control tokens"),
                          ("--mood=calm", "--mood: this model was trained without control tokens")]:
        with pytest.raises(SystemExit, match=message) as e:
            generate.main(_cli_args(workdir, tmp_path, flag))
        assert "\n" not in str(e.value)


def test_an_empty_controls_flag_samples_todays_pieces(run):
    today = run.generate_ids(n=2, max_events=40, seed=3)
    empty = run.generate_ids(n=2, max_events=40, seed=3, controls="", mood="")
    for a, b in zip(today, empty):
        np.testing.assert_array_equal(a, b)


def test_controls_and_mood_from_the_command_line(tmp_path):
    import json as json_lib

    from data_prep import controls as data_controls

    spec = {"seconds": 1.0, "levels": 8, "edges": {n: [float(i) for i in range(1, 8)] for n in data_controls.BINNED}}
    workdir = str(tmp_path / "run")
    _save_checkpoint(workdir, Vocabulary(STYLES).with_controls(spec))
    out = tmp_path / "out"
    generate.main(_cli_args(workdir, out, "--num_samples=2", "--max_seconds=3", "--max_copy_seconds=0",
                            "--controls=0:density=2;2:density=high", "--mood=sad"))
    lines = [json_lib.loads(x) for x in (out / "manifest.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[0]["settings"]["controls"] == "0:density=2;2:density=high"
    assert lines[0]["settings"]["mood"] == "sad"
    for flag, message in [("--controls=density=9", "--controls: density=9 is out of range; use a level 1..8"),
                          ("--controls=0:density=2;5:mode=minor;3:density=4", "--controls: times must increase"),
                          ("--controls=speed=2", "--controls: unknown control 'speed'"),
                          ("--mood=angry", "--mood=angry: unknown mood")]:
        with pytest.raises(SystemExit, match=message) as e:
            generate.main(_cli_args(workdir, tmp_path / "bad", flag))
        assert "\n" not in str(e.value)
    # --contrast_style: pairs of the model's styles, recorded in the manifest.
    with pytest.raises(SystemExit, match="--contrast_style: unknown style 'mozart'; this model knows bach, chopin"):
        generate.main(_cli_args(workdir, tmp_path / "bad", "--controls=density=2", "--contrast_style=bach:mozart"))
    generate.main(_cli_args(workdir, tmp_path / "pairs", "--num_samples=1", "--max_seconds=2", "--max_copy_seconds=0",
                            "--style=bach", "--controls=density=2", "--contrast_style=bach:folk"))
    line = json_lib.loads((tmp_path / "pairs" / "manifest.jsonl").read_text().splitlines()[0])
    assert line["settings"]["contrast_style"] == "bach:folk"
