// mgpt live: the page. It sends what you play to the local server over a WebSocket and plays
// the model's notes at the times they are meant to sound, scheduled on the AudioContext clock
// (or on a MIDI output with Web MIDI's timestamps). Times are performance.now() milliseconds,
// which the server is told in `hello`. Nothing here is fetched from anywhere but this server.
'use strict';

const $ = (id) => document.getElementById(id);
const MODEL_CHANNEL = 1;  // the model plays on MIDI channel 2 (0-based 1), the player on channel 1
const ROLL_SECONDS = 12;
const SETTINGS = ['mode', 'style', 'temperature', 'top_p', 'guidance', 'answer_seconds', 'silence_ms', 'pedal_cc'];

const state = {
  ws: null, settings: {}, pitchRange: [21, 108], notes: [], open: new Map(),
  scheduled: [],  // model events not yet due: {t, on, pitch, voice, cancelled}
  voices: new Map(),  // model pitch -> sounding synth voices
  userVoices: new Map(),
  midiIn: null, midiOut: null, octave: 0, selection: null, lagMs: [],
  // What tests and the curious can read: every model note received, when it was scheduled, how late.
  stats: { received: [], scheduledAt: [], answers: [], errors: [] },
};
window.mgptLive = state;

// ------------------------------------------------------------------ audio: a small synth, no samples
let audio = null;
function ctx() {
  if (!audio) {
    audio = new (window.AudioContext || window.webkitAudioContext)({ latencyHint: 'interactive' });
    const master = audio.createGain();
    master.gain.value = 0.25;
    master.connect(audio.destination);
    audio.master = master;
  }
  if (audio.state === 'suspended') audio.resume();
  return audio;
}
const hz = (pitch) => 440 * Math.pow(2, (pitch - 69) / 12);
function audioTime(tMs) {  // performance.now() ms -> AudioContext seconds
  const a = ctx();
  return Math.max(a.currentTime, a.currentTime + (tMs - performance.now()) / 1000);
}
function voiceOn(pitch, vel, when, wave) {
  const a = ctx();
  const osc = a.createOscillator(), gain = a.createGain();
  osc.type = wave; osc.frequency.value = hz(pitch);
  const peak = 0.05 + 0.5 * (vel / 127);
  gain.gain.setValueAtTime(0, when);
  gain.gain.linearRampToValueAtTime(peak, when + 0.005);
  gain.gain.setTargetAtTime(peak * 0.4, when + 0.01, 0.4);
  osc.connect(gain).connect(a.master);
  osc.start(when);
  return { osc, gain, start: when };
}
function voiceOff(v, when) {
  when = Math.max(when, v.start + 0.01);
  v.gain.gain.cancelScheduledValues(when);
  v.gain.gain.setTargetAtTime(0, when, 0.05);
  v.osc.stop(when + 0.5);
}

// ------------------------------------------------------------------ the server
function connect() {
  const ws = new WebSocket(`ws://${location.host}/ws`);
  state.ws = ws;
  ws.onopen = () => { ws.send(JSON.stringify({ type: 'hello', now: performance.now() })); };
  ws.onclose = () => { $('status').textContent = 'disconnected (reload to reconnect)'; };
  ws.onmessage = (e) => handle(JSON.parse(e.data));
}
function send(msg) { if (state.ws && state.ws.readyState === 1) state.ws.send(JSON.stringify(msg)); }

function handle(m) {
  if (m.type === 'ready') {
    state.pitchRange = m.pitch_range;
    const style = $('style');
    style.innerHTML = '';
    for (const s of m.styles) style.add(new Option(s.replace(/_/g, ' '), s));
    showSettings(m.settings);
    setupAttributes(m.controls, m.settings.controls);
    $('status').textContent = `connected${m.fim ? '' : ' (this model cannot infill)'}`;
    state.fim = m.fim;
  } else if (m.type === 'note') {
    modelNote(m);
  } else if (m.type === 'retract') {
    retract(m.after);
  } else if (m.type === 'answer') {
    state.stats.answers.push({ ...m, at: performance.now() });
  } else if (m.type === 'settings') {
    showSettings(m.settings);
  } else if (m.type === 'error') {
    state.stats.errors.push(m.line);
    $('message').textContent = m.line;
  } else if (m.type === 'undone') {
    state.notes = state.notes.filter((n) => !(n.who === 'model' && n.answer === m.answer));
    for (const s of state.scheduled) if (s.answer === m.answer) s.cancelled = true;
  } else if (m.type === 'cleared') {
    state.notes = []; state.open.clear(); state.scheduled = [];
  } else if (m.type === 'take') {
    state.notes = m.notes.map((n) => ({ ...n, answer: -1 }));
    playStretch(m.notes.filter((n) => n.who === 'model'), m.stretch[0]);
    state.selection = null; $('infill').disabled = true;
  } else if (m.type === 'midi') {
    const bytes = Uint8Array.from(atob(m.data), (c) => c.charCodeAt(0));
    const a = document.createElement('a');
    a.href = URL.createObjectURL(new Blob([bytes], { type: 'audio/midi' }));
    a.download = 'mgpt-live.mid';
    a.click();
  }
}

function showSettings(s) {
  state.settings = s;
  for (const key of SETTINGS) {
    const el = $(key);
    if (!el || document.activeElement === el) continue;
    el.value = s[key];
    const out = el.parentElement.querySelector('output');
    if (out) out.textContent = s[key];
  }
}

// ------------------------------------------------------------------ the model's notes
function modelNote(m) {
  const now = performance.now();
  state.stats.received.push({ ...m, at: now });
  const late = now - m.t;
  state.lagMs.push([now, Math.max(0, late)]);
  const ev = { t: m.t, on: m.on, pitch: m.pitch, vel: m.vel, answer: m.answer, cancelled: false };
  state.scheduled.push(ev);
  if (m.on) {
    state.stats.scheduledAt.push({ at: now, t: m.t });
    const note = { pitch: m.pitch, vel: m.vel, start: m.t, end: null, who: 'model', answer: m.answer };
    state.notes.push(note);
    ev.note = note;
  } else {
    const note = [...state.notes].reverse().find((n) => n.who === 'model' && n.pitch === m.pitch && n.end === null);
    if (note) { note.end = m.t; ev.note = note; }
  }
  if (state.midiOut) {  // Web MIDI schedules on the same performance.now() clock
    state.midiOut.send([(m.on ? 0x90 : 0x80) | MODEL_CHANNEL, m.pitch, m.on ? m.vel : 0], Math.max(now, m.t));
    ev.sent = true;
  } else if (m.on) {
    ev.voice = voiceOn(m.pitch, m.vel, audioTime(m.t), 'triangle');
    const list = state.voices.get(m.pitch) || [];
    list.push(ev.voice); state.voices.set(m.pitch, list);
  } else {
    const list = state.voices.get(m.pitch) || [];
    const v = list.shift();
    if (v) { voiceOff(v, audioTime(m.t)); ev.voice = v; }
  }
}

function retract(after) {
  // The server dropped its events after `after`: notes not yet begun are silenced, releases not
  // yet due are taken back (the notes sound on until the model's next NOTE_OFF of them).
  for (const ev of state.scheduled) {
    if (ev.t <= after + 0.5 || ev.cancelled) continue;
    ev.cancelled = true;
    if (ev.on) {
      if (ev.voice) { try { ev.voice.osc.stop(); } catch (e) { /* not started */ } }
      const list = state.voices.get(ev.pitch) || [];
      state.voices.set(ev.pitch, list.filter((v) => v !== ev.voice));
      state.notes = state.notes.filter((n) => n !== ev.note);
    } else if (ev.voice) {
      ev.voice.gain.gain.cancelScheduledValues(ctx().currentTime);
      ev.voice.osc.stop(ctx().currentTime + 600);
      (state.voices.get(ev.pitch) || []).unshift(ev.voice);
      if (ev.note) ev.note.end = null;
    } else if (ev.note) {
      ev.note.end = null;
    }
  }
  if (state.midiOut) {  // Web MIDI cannot take back one message: drop all pending, silence the model's channel
    if (state.midiOut.clear) state.midiOut.clear();
    state.midiOut.send([0xb0 | MODEL_CHANNEL, 123, 0]);
  }
  const now = performance.now();
  state.scheduled = state.scheduled.filter((ev) => !ev.cancelled && ev.t > now - 2000);
}

function playStretch(notes, from) {  // an infilled stretch, heard at once
  const shift = performance.now() + 100 - from;
  for (const n of notes) {
    const v = voiceOn(n.pitch, n.vel, audioTime(n.start + shift), 'triangle');
    voiceOff(v, audioTime(n.end + shift));
  }
}

// ------------------------------------------------------------------ what you play
function userNote(on, pitch, vel, t = performance.now()) {
  if (on) {
    const v = state.midiOut ? null : voiceOn(pitch, vel, ctx().currentTime, 'sine');
    state.userVoices.set(pitch, v);
    const note = { pitch, vel, start: t, end: null, who: 'user', answer: 0 };
    state.notes.push(note); state.open.set(pitch, note);
  } else {
    const v = state.userVoices.get(pitch);
    if (v) voiceOff(v, ctx().currentTime);
    state.userVoices.delete(pitch);
    const note = state.open.get(pitch);
    if (note) { note.end = t; state.open.delete(pitch); }
  }
  if (state.midiOut) state.midiOut.send([on ? 0x90 : 0x80, pitch, on ? vel : 0]);
  keyShown(pitch, on);
  send({ type: 'note', on, pitch, vel, t });
}

function buildKeyboard() {
  const kb = $('keyboard');
  kb.innerHTML = '';
  const lo = 48, hi = 84;  // C3..C6 on screen; the computer keyboard and MIDI reach the rest
  const whites = [];
  for (let p = lo; p <= hi; p++) if (![1, 3, 6, 8, 10].includes(p % 12)) whites.push(p);
  const w = 100 / whites.length;
  for (let p = lo; p <= hi; p++) {
    const black = [1, 3, 6, 8, 10].includes(p % 12);
    const k = document.createElement('div');
    k.className = `key ${black ? 'black' : 'white'}`;
    k.dataset.pitch = p;
    const i = whites.filter((x) => x < p).length;
    k.style.left = `${black ? i * w - w * 0.3 : i * w}%`;
    k.style.width = `${black ? w * 0.6 : w}%`;
    kb.appendChild(k);
  }
  const pressed = new Map();  // pointer id -> pitch
  kb.addEventListener('pointerdown', (e) => {
    const p = e.target.dataset && e.target.dataset.pitch;
    if (!p) return;
    e.preventDefault();
    kb.setPointerCapture(e.pointerId);
    pressed.set(e.pointerId, +p);
    userNote(true, +p, 90);
  });
  const up = (e) => {
    if (!pressed.has(e.pointerId)) return;
    userNote(false, pressed.get(e.pointerId), 0);
    pressed.delete(e.pointerId);
  };
  kb.addEventListener('pointerup', up);
  kb.addEventListener('pointercancel', up);
}
function keyShown(pitch, down, who = 'down') {
  const k = document.querySelector(`.key[data-pitch="${pitch}"]`);
  if (k) k.classList.toggle(who, down);
}

const KEYS = 'awsedftgyhujk';  // C..C an octave up, as on most computer-keyboard instruments
const held = new Set();
document.addEventListener('keydown', (e) => {
  if (e.target.tagName === 'INPUT' || e.target.tagName === 'SELECT' || e.repeat || e.ctrlKey || e.metaKey) return;
  const k = e.key.toLowerCase();
  if (k === 'z') { state.octave = Math.max(-3, state.octave - 1); return; }
  if (k === 'x') { state.octave = Math.min(3, state.octave + 1); return; }
  const i = KEYS.indexOf(k);
  if (i < 0 || held.has(k)) return;
  const pitch = 60 + 12 * state.octave + i;
  held.add(k); held[k] = pitch;
  userNote(true, pitch, 90);
});
document.addEventListener('keyup', (e) => {
  const k = e.key.toLowerCase();
  if (!held.has(k)) return;
  held.delete(k);
  userNote(false, held[k], 0);
});

// ------------------------------------------------------------------ Web MIDI
async function setupMidi() {
  if (!navigator.requestMIDIAccess) { $('midi_in').disabled = $('midi_out').disabled = true; return; }
  let access;
  try { access = await navigator.requestMIDIAccess(); } catch (e) { return; }
  const fill = () => {
    for (const [sel, ports] of [[$('midi_in'), access.inputs], [$('midi_out'), access.outputs]]) {
      const keep = sel.value;
      while (sel.options.length > 1) sel.remove(1);
      for (const port of ports.values()) sel.add(new Option(port.name, port.id));
      // A device chosen stays chosen; otherwise the first device there is (a keyboard plugged in is meant to be played).
      const first = sel.options.length > 1 ? sel.options[1].value : '';
      sel.value = keep && [...sel.options].some((o) => o.value === keep) ? keep : first;
    }
    pickIn(); pickOut();
  };
  const pickIn = () => {
    if (state.midiIn) state.midiIn.onmidimessage = null;
    state.midiIn = access.inputs.get($('midi_in').value) || null;
    if (state.midiIn) state.midiIn.onmidimessage = onMidi;
  };
  const pickOut = () => { state.midiOut = access.outputs.get($('midi_out').value) || null; };
  $('midi_in').onchange = pickIn;
  $('midi_out').onchange = pickOut;
  access.onstatechange = fill;
  fill();
}
function onMidi(e) {
  const [status, a, b] = e.data;
  const kind = status & 0xf0;
  const t = e.timeStamp || performance.now();
  if (kind === 0x90 && b > 0) userNote(true, a, b, t);
  else if (kind === 0x80 || (kind === 0x90 && b === 0)) userNote(false, a, 0, t);
  else if (kind === 0xb0) send({ type: 'cc', cc: a, value: b, t });
}

// ------------------------------------------------------------------ attribute controls
const ATTRIBUTES = ['density', 'polyphony', 'register', 'loudness', 'mode'];
const MODE_NAMES = ['major', 'minor', 'none'];

// One menu per control, 'free' and the levels the model knows; a change is sent as the
// `controls` setting ("density=6,mode=minor"), which the server applies from the next segment.
function setupAttributes(spec, current) {
  const section = $('attributes');
  section.hidden = !spec;
  if (!spec) return;
  const asked = Object.fromEntries((current || '').split(',').filter(Boolean).map((kv) => kv.split('=')));
  for (const name of ATTRIBUTES) {
    const el = $(`ctl_${name}`);
    el.innerHTML = '';
    el.add(new Option('free', 'free'));
    const levels = (spec.seen && spec.seen[name]) ||
      (name === 'mode' ? [1, 2, 3] : Array.from({ length: spec.levels }, (_, i) => i + 1));
    for (const k of levels) {
      const value = name === 'mode' ? MODE_NAMES[k - 1] : String(k);
      el.add(new Option(value, value));
    }
    el.value = asked[name] || 'free';
    el.onchange = () => {
      const parts = ATTRIBUTES.map((a) => [a, $(`ctl_${a}`).value]).filter(([, v]) => v !== 'free');
      send({ type: 'set', controls: parts.map(([a, v]) => `${a}=${v}`).join(',') });
    };
  }
}

// ------------------------------------------------------------------ controls
function setupControls() {
  for (const key of SETTINGS) {
    const el = $(key);
    el.addEventListener('input', () => {
      const out = el.parentElement.querySelector('output');
      if (out) out.textContent = el.value;
    });
    el.addEventListener('change', () => {
      const value = (key === 'mode' || key === 'style') ? el.value : Number(el.value);
      send({ type: 'set', [key]: value });
    });
  }
  $('handover').onclick = () => send({ type: 'cc', cc: state.settings.pedal_cc, value: 127, t: performance.now() });
  $('undo').onclick = () => send({ type: 'undo' });
  $('clear').onclick = () => send({ type: 'clear' });
  $('download').onclick = () => send({ type: 'export' });
  $('infill').onclick = () => {
    if (state.selection) send({ type: 'infill', start: state.selection[0], end: state.selection[1] });
  };
  const roll = $('roll');
  let dragFrom = null;
  const timeAt = (e) => {
    const r = roll.getBoundingClientRect();
    return performance.now() - ROLL_SECONDS * 1000 * (1 - (e.clientX - r.left) / r.width);
  };
  roll.addEventListener('pointerdown', (e) => { dragFrom = timeAt(e); state.selection = null; });
  roll.addEventListener('pointermove', (e) => {
    if (dragFrom === null) return;
    const t = timeAt(e);
    state.selection = [Math.min(dragFrom, t), Math.max(dragFrom, t)];
  });
  roll.addEventListener('pointerup', () => {
    dragFrom = null;
    $('infill').disabled = !(state.selection && state.fim && state.selection[1] - state.selection[0] > 50);
  });
  document.addEventListener('pointerdown', () => ctx(), { once: true });  // audio may start only after a gesture
}

// ------------------------------------------------------------------ the piano roll and the lag
function draw() {
  const c = $('roll'), g = c.getContext('2d');
  const w = c.width = c.clientWidth, h = c.height = c.clientHeight;
  const now = performance.now(), span = ROLL_SECONDS * 1000;
  const [lo, hi] = state.pitchRange;
  const x = (t) => w * (1 - (now - t) / span);
  const rowH = h / (hi - lo + 1);
  g.clearRect(0, 0, w, h);
  g.fillStyle = '#f2f2f2';
  for (let p = lo; p <= hi; p++) if ([1, 3, 6, 8, 10].includes(p % 12)) g.fillRect(0, h - (p - lo + 1) * rowH, w, rowH);
  if (state.selection) {
    g.fillStyle = 'rgba(120, 180, 120, 0.25)';
    g.fillRect(x(state.selection[0]), 0, x(state.selection[1]) - x(state.selection[0]), h);
  }
  for (const n of state.notes) {
    const end = n.end === null ? now : n.end;
    if (end < now - span) continue;
    g.fillStyle = n.who === 'model' ? '#e07b00' : '#2a6fdb';
    g.fillRect(x(n.start), h - (n.pitch - lo + 1) * rowH, Math.max(2, x(end) - x(n.start)), Math.max(2, rowH));
  }
  g.strokeStyle = '#888';
  g.beginPath(); g.moveTo(w - 1, 0); g.lineTo(w - 1, h); g.stroke();
  // Keys light up while the model's notes sound.
  for (const k of document.querySelectorAll('.key.model')) k.classList.remove('model');
  for (const n of state.notes) {
    if (n.who === 'model' && n.start <= now && (n.end === null || n.end > now)) keyShown(n.pitch, true, 'model');
  }
  state.lagMs = state.lagMs.filter(([at]) => at > now - 3000);
  const lag = Math.max(0, ...state.lagMs.map(([, l]) => l));
  const el = $('lag');
  el.textContent = state.lagMs.length ? `lag ${lag.toFixed(0)} ms` : 'lag –';
  el.classList.toggle('slow', lag > 30);
  if (state.notes.length > 5000) state.notes = state.notes.filter((n) => n.end === null || n.end > now - span);
  requestAnimationFrame(draw);
}

buildKeyboard();
setupControls();
setupMidi();
connect();
requestAnimationFrame(draw);
