// Runs the dense and the pruned model of web.json on the sample images with onnxruntime-web (wasm),
// times them, shows the results and publishes them as JSON for tests and CI.
import * as ort from './ort/ort.wasm.min.mjs';

const params = new URLSearchParams(location.search);
const REPEATS = positiveInt(params.get('repeats'), 20);
const WARMUP = 3;
const B1_INNER = 10;   // batch-1 runs per timed repeat: the browser clock is coarse (0.1 ms without isolation)
const BIG = 64;
const MODELS = ['dense', 'pruned'];

const $ = (id) => document.getElementById(id);
let queue = Promise.resolve();   // one session.run at a time: measurements and the drawing share the sessions
const serial = (fn) => (queue = queue.then(fn, fn));

function positiveInt(text, fallback) {
  const v = Number.parseInt(text ?? '', 10);
  return Number.isFinite(v) && v >= 1 ? v : fallback;
}

function fail(message) {
  window.obdpruneError = message;
  const s = $('status');
  s.textContent = message;
  s.className = 'status error';
}

async function fetchBytes(file) {
  const r = await fetch(file);
  if (!r.ok) throw new Error(`${file}: HTTP ${r.status}`);
  return new Uint8Array(await r.arrayBuffer());
}

const median = (xs) => {
  const s = [...xs].sort((a, b) => a - b);
  const m = s.length >> 1;
  return s.length % 2 ? s[m] : (s[m - 1] + s[m]) / 2;
};
const argmax = (row) => row.reduce((best, v, i) => (v > row[best] ? i : best), 0);
const kb = (n) => (n >= 1e6 ? `${(n / 1e6).toFixed(2)} MB` : `${(n / 1e3).toFixed(1)} kB`);
const ms = (t) => `${t < 1 ? t.toFixed(3) : t.toFixed(2)} ms`;
const pct = (a) => `${(100 * a).toFixed(1)}%`;

async function run(session, data, batch, shape) {
  const input = new ort.Tensor('float32', data, [batch, ...shape]);
  const out = await session.run({ [session.inputNames[0]]: input });
  return out[session.outputNames[0]].data;
}

function rows(flat, n) {
  const k = flat.length / n;
  return Array.from({ length: n }, (_, i) => Array.from(flat.subarray(i * k, (i + 1) * k)));
}

// Median milliseconds per run for every session, interleaved: each repeat visits the sessions in an order
// rotated by one, so a slow moment of a shared machine falls on all of them alike.
async function timeSessions(sessions, data, batch, shape, inner) {
  const names = Object.keys(sessions);
  const times = Object.fromEntries(names.map((n) => [n, []]));
  for (let w = 0; w < WARMUP; w++) for (const n of names) await run(sessions[n], data, batch, shape);
  for (let r = 0; r < REPEATS; r++) {
    const order = names.map((_, i) => names[(i + r) % names.length]);
    for (const n of order) {
      const t0 = performance.now();
      for (let i = 0; i < inner; i++) await run(sessions[n], data, batch, shape);
      times[n].push((performance.now() - t0) / inner);
    }
  }
  return Object.fromEntries(names.map((n) => [n, median(times[n])]));
}

// ---- drawing of images -------------------------------------------------------------------------------

// Normalized (C, H, W) floats back to RGBA pixels: x * std + mean is the intensity in [0, 1].
function toImageData(meta, x) {
  const [C, H, W] = meta.input_shape;
  const img = new ImageData(W, H);
  for (let p = 0; p < H * W; p++) {
    for (let c = 0; c < 3; c++) {
      const ch = C === 1 ? 0 : c;
      const v = x[ch * H * W + p] * meta.std[ch] + meta.mean[ch];
      img.data[4 * p + c] = Math.round(255 * Math.min(1, Math.max(0, v)));
    }
    img.data[4 * p + 3] = 255;
  }
  return img;
}

// A canvas's pixels to the model input, as in training: resize to (H, W), gray or RGB, then
// (intensity - mean) / std per channel. Gray is ITU-R 601 luma, as PIL's convert("L").
function preprocess(meta, source, invert) {
  const [C, H, W] = meta.input_shape;
  const small = document.createElement('canvas');
  small.width = W; small.height = H;
  const ctx = small.getContext('2d', { willReadFrequently: true });
  ctx.imageSmoothingEnabled = true;
  ctx.imageSmoothingQuality = 'high';
  ctx.drawImage(source, 0, 0, W, H);
  const px = ctx.getImageData(0, 0, W, H).data;
  const x = new Float32Array(C * H * W);
  for (let p = 0; p < H * W; p++) {
    const rgb = [px[4 * p], px[4 * p + 1], px[4 * p + 2]].map((v) => (invert ? 255 - v : v) / 255);
    if (C === 1) {
      x[p] = (0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2] - meta.mean[0]) / meta.std[0];
    } else {
      for (let c = 0; c < C; c++) x[c * H * W + p] = (rgb[c] - meta.mean[c]) / meta.std[c];
    }
  }
  return x;
}

function softmax(row) {
  const m = Math.max(...row);
  const e = row.map((v) => Math.exp(v - m));
  const s = e.reduce((a, b) => a + b, 0);
  return e.map((v) => v / s);
}

function showGuesses(list, classes, logits) {
  const p = softmax(logits);
  const top = p.map((v, i) => [v, i]).sort((a, b) => b[0] - a[0]).slice(0, 3);
  list.replaceChildren(...top.map(([v, i], rank) => {
    const li = document.createElement('li');
    li.className = rank === 0 ? 'top' : '';
    li.innerHTML = `<span class="name"></span><span class="bar"><span style="width:${(100 * v).toFixed(1)}%"></span></span><span class="p">${pct(v)}</span>`;
    li.querySelector('.name').textContent = classes[i];
    return li;
  }));
}

// ---- the page -----------------------------------------------------------------------------------------

function fillCard(id, rowsOf) {
  const dl = document.querySelector(`#${id} dl`);
  dl.replaceChildren(...rowsOf.flatMap(([k, v, note]) => {
    const dt = document.createElement('dt');
    dt.textContent = k;
    const dd = document.createElement('dd');
    dd.textContent = v;
    if (note) {
      const s = document.createElement('span');
      s.className = `ratio${note.startsWith('0.') ? '' : ' worse'}`;
      s.textContent = note;
      dd.append(' ', s);
    }
    return [dt, dd];
  }));
}

function renderCards(meta, results) {
  const d = results.dense;
  for (const name of MODELS) {
    const r = results[name];
    const m = meta.models[name];
    const ratio = (a, b) => (name === 'pruned' ? `${(a / b).toFixed(2)}×` : '');
    fillCard(`card-${name}`, [
      ['Download', kb(r.bytes), ratio(r.bytes, d.bytes)],
      ['Batch 1', ms(r.ms_b1), ratio(r.ms_b1, d.ms_b1)],
      [`Batch ${BIG}`, ms(r.ms_b64), ratio(r.ms_b64, d.ms_b64)],
      [`Accuracy, ${results.labels.length} images`, pct(r.accuracy), ''],
      ['Accuracy, test set', pct(m.test_accuracy), ''],
      ['Weights', m.weights.toLocaleString('en'), ratio(m.weights, meta.models.dense.weights)],
      ['Multiply-adds', m.macs.toLocaleString('en'), ratio(m.macs, meta.models.dense.macs)],
    ]);
  }
}

function renderGrid(meta, samples, results) {
  const [C, H, W] = meta.input_shape;
  const per = C * H * W;
  const tiles = results.labels.map((label, i) => {
    const fig = document.createElement('figure');
    const c = document.createElement('canvas');
    c.width = W; c.height = H;
    c.getContext('2d').putImageData(toImageData(meta, samples.subarray(i * per, (i + 1) * per)), 0, 0);
    const cap = document.createElement('figcaption');
    const truth = document.createElement('b');
    truth.textContent = meta.classes[label];
    cap.append(truth);
    for (const name of MODELS) {
      const pred = results[name].predictions[i];
      const s = document.createElement('span');
      s.className = `pred ${pred === label ? 'ok' : 'wrong'}`;
      s.title = `${name}: ${meta.classes[pred]}`;
      s.innerHTML = `<span class="dot ${name}"></span>`;
      s.append(meta.classes[pred]);
      cap.append(s);
    }
    if (MODELS.some((n) => results[n].predictions[i] !== label)) fig.className = 'miss';
    fig.append(c, cap);
    return fig;
  });
  $('grid').replaceChildren(...tiles);
  $('samples-note').textContent = `${results.labels.length} images drawn at random from the test set, with the true class in bold ` +
    'and each model\'s answer below it (red where wrong).';
}

function setupDrawing(meta, sessions) {
  const [C, H, W] = meta.input_shape;
  const draw = $('draw');
  const ctx = draw.getContext('2d', { willReadFrequently: true });
  const seen = $('seen');
  seen.width = W; seen.height = H;
  const clear = () => { ctx.fillStyle = '#000'; ctx.fillRect(0, 0, draw.width, draw.height); };
  clear();
  let drawing = false;
  let last = null;
  const at = (e) => {
    const r = draw.getBoundingClientRect();
    return [(e.clientX - r.left) * draw.width / r.width, (e.clientY - r.top) * draw.height / r.height];
  };
  const predict = () => serial(async () => {
    const x = preprocess(meta, draw, $('invert').checked);
    seen.getContext('2d').putImageData(toImageData(meta, x), 0, 0);
    const input = { input: Array.from(x) };
    for (const name of MODELS) {
      const logits = Array.from(await run(sessions[name], x, 1, meta.input_shape));
      showGuesses($(`guess-${name}`), meta.classes, logits);
      input[name] = { logits, prediction: argmax(logits) };
    }
    window.obdpruneLastInput = input;
  });
  draw.addEventListener('pointerdown', (e) => { drawing = true; last = at(e); draw.setPointerCapture(e.pointerId); });
  draw.addEventListener('pointermove', (e) => {
    if (!drawing) return;
    const p = at(e);
    ctx.strokeStyle = '#fff';
    ctx.lineWidth = draw.width / 12;
    ctx.lineCap = ctx.lineJoin = 'round';
    ctx.beginPath(); ctx.moveTo(...last); ctx.lineTo(...p); ctx.stroke();
    last = p;
  });
  const end = () => { if (drawing) { drawing = false; predict(); } };
  draw.addEventListener('pointerup', end);
  draw.addEventListener('pointercancel', end);
  $('clear').addEventListener('click', () => { clear(); predict(); });
  $('invert').addEventListener('change', predict);
  const load = (file) => {
    if (!file || !file.type.startsWith('image/')) return;
    const img = new Image();
    img.onload = () => {
      clear();
      const s = Math.min(draw.width / img.width, draw.height / img.height);
      const w = img.width * s, h = img.height * s;
      ctx.drawImage(img, (draw.width - w) / 2, (draw.height - h) / 2, w, h);
      URL.revokeObjectURL(img.src);
      // Photos are mostly dark on light; the training images of MNIST-like sets are light on dark.
      const edge = ctx.getImageData(0, 0, draw.width, 4).data;
      let sum = 0;
      for (let i = 0; i < edge.length; i += 4) sum += edge[i] + edge[i + 1] + edge[i + 2];
      $('invert').checked = C === 1 && sum / (edge.length / 4) / 765 > 0.5;
      predict();
    };
    img.src = URL.createObjectURL(file);
  };
  draw.addEventListener('dragover', (e) => { e.preventDefault(); draw.classList.add('over'); });
  draw.addEventListener('dragleave', () => draw.classList.remove('over'));
  draw.addEventListener('drop', (e) => { e.preventDefault(); draw.classList.remove('over'); load(e.dataTransfer.files[0]); });
  $('file').addEventListener('change', (e) => load(e.target.files[0]));
}

async function main() {
  const meta = await (await fetch('web.json')).json();
  const [C, H, W] = meta.input_shape;
  const per = C * H * W;
  $('title').textContent = `${meta.model} on ${meta.dataset}: dense and pruned, in your browser`;
  $('input-size').textContent = `${W}×${H} pixels`;
  $('input-color').textContent = C === 1 ? 'grayscale' : 'RGB';
  const p = meta.prune || {};
  $('method').textContent = `Pruned with ${p.method ?? '?'} by ${p.granularity ?? '?'}` +
    (p.budget === 'macs' ? ', counting multiply-adds' : '') + ', then compacted: removed filters and neurons are gone from the file.';

  const isolated = self.crossOriginIsolated === true;
  const asked = positiveInt(params.get('threads'), 0);
  const threads = isolated ? (asked || Math.min(4, Math.ceil((navigator.hardwareConcurrency || 1) / 2))) : 1;
  ort.env.wasm.numThreads = threads;
  ort.env.wasm.wasmPaths = new URL('./ort/', import.meta.url).href;
  ort.env.logLevel = 'error';

  $('status').textContent = 'Loading models…';
  const samples = new Float32Array((await fetchBytes(meta.samples.file)).buffer);
  const n = meta.samples.count;
  if (samples.length !== n * per) throw new Error(`${meta.samples.file} holds ${samples.length} floats, expected ${n * per}`);
  const options = { executionProviders: ['wasm'], graphOptimizationLevel: 'all' };
  const sessions = {};
  const bytes = {};
  for (const name of [...MODELS, 'floor']) {
    const file = name === 'floor' ? meta.floor.file : meta.models[name].file;
    const buf = await fetchBytes(file);
    bytes[name] = buf.byteLength;
    sessions[name] = await ort.InferenceSession.create(buf, options);
  }
  setupDrawing(meta, sessions);

  const labels = meta.samples.labels;
  const results = { labels, classes: meta.classes, threads, crossOriginIsolated: isolated, onnxruntimeWeb: ort.env.versions?.web ?? meta.onnxruntime_web,
                    repeats: REPEATS, warmup: WARMUP, b1Inner: B1_INNER, userAgent: navigator.userAgent };
  await serial(async () => {
    $('status').textContent = 'Running on the test images…';
    for (const name of MODELS) {
      const logits = rows(await run(sessions[name], samples, n, meta.input_shape), n);
      const predictions = logits.map(argmax);
      const accuracy = predictions.filter((v, i) => v === labels[i]).length / n;
      results[name] = { predictions, accuracy, bytes: bytes[name], logits };
    }
    $('status').textContent = `Timing: median of ${REPEATS} repeats at batch 1 and ${BIG}…`;
    const big = new Float32Array(BIG * per);
    for (let i = 0; i < BIG; i++) big.set(samples.subarray((i % n) * per, (i % n + 1) * per), i * per);
    const one = samples.slice(0, per);
    const t1 = await timeSessions(sessions, one, 1, meta.input_shape, B1_INNER);
    const t64 = await timeSessions(sessions, big, BIG, meta.input_shape, 1);
    for (const name of MODELS) Object.assign(results[name], { ms_b1: t1[name], ms_b64: t64[name] });
    results.floor = { ms_b1: t1.floor, ms_b64: t64.floor, bytes: bytes.floor };
  });

  renderCards(meta, results);
  renderGrid(meta, samples, results);
  $('about').textContent =
    `onnxruntime-web ${results.onnxruntimeWeb}, WebAssembly backend, ${threads} thread${threads > 1 ? 's' : ''}` +
    (isolated ? ' (the page is cross-origin isolated).' : ' (one, because the page is not cross-origin isolated; "obdprune serve" sends the headers that allow more).') +
    ` Latency is the median of ${REPEATS} repeats after ${WARMUP} warm-up runs, models taking turns; at batch 1 each repeat ` +
    `averages ${B1_INNER} consecutive runs. Batch ${BIG} repeats the ${n} images. The floor, an identity model that does no work, takes ` +
    `${ms(results.floor.ms_b1)} at batch 1 and ${ms(results.floor.ms_b64)} at batch ${BIG}: the fixed cost of one call. ` +
    'Download is the size of the ONNX file; the WebAssembly runtime itself is the same for both models.';
  $('obdprune-results').textContent = JSON.stringify(results);
  window.obdpruneResults = results;
  const s = $('status');
  s.textContent = `Done: the pruned model downloads ${(results.pruned.bytes / results.dense.bytes).toFixed(2)}× and takes ` +
    `${(results.pruned.ms_b64 / results.dense.ms_b64).toFixed(2)}× the time of the dense one at batch ${BIG}, on ${threads} thread${threads > 1 ? 's' : ''}.`;
  s.className = 'status done';
}

main().catch((e) => fail(`Something went wrong: ${e && e.message ? e.message : e}`));
