// An edgetl bundle in a web page: the bundle's tokenizer (tokenizers.js reads its tokenizer.json) and its ONNX
// model (onnxruntime-web: WebAssembly, or WebGPU where the page ships that build and the browser offers an
// adapter), cutting texts as edgetl's Python runtime does, so a page answers what `edgetl predict` (a classifier's
// labels, a token classifier's entities) or `edgetl embed` (a sentence-embedding model's vectors) answers. Written by
// `edgetl export-web`; nothing here reaches the network beyond the folder it is served from.
import { Tokenizer } from "./vendor/tokenizers.min.mjs";

const WEBGPU_BUILD = "ort.webgpu.min.mjs";

export const SUPPORTED = { format: "edgetl-bundle", versions: [1], tasks: ["text-classification", "sentence-embedding", "token-classification"] };

/** Why this page cannot run the bundle whose edgetl.json is `manifest`, or null. */
export function unsupported(manifest) {
  if (manifest.format !== SUPPORTED.format) return `edgetl.json is not an edgetl bundle manifest (format ${manifest.format})`;
  if (!SUPPORTED.versions.includes(manifest.format_version)) {
    return `bundle format version ${manifest.format_version} is newer than this page reads (${SUPPORTED.versions.join(", ")}): export it again with the edgetl that made it`;
  }
  const task = manifest.task ?? "text-classification";
  if (!SUPPORTED.tasks.includes(task)) return `a ${task} bundle: this page runs ${SUPPORTED.tasks.join(", ")} bundles`;
  if (manifest.text_pair) return "the model reads pairs of texts; this page runs single texts";
  if (task === "token-classification" && manifest.truncation === "head+tail") {
    return "truncation head+tail cuts tokens out of a sentence's middle, and with them the words entities are made of";
  }
  if (task === "sentence-embedding" && !Number.isInteger(manifest.embedding?.dimension)) {
    return "a sentence-embedding bundle without the vectors' dimension (its embedding section)";
  }
  if (!manifest.models?.onnx) return "the bundle has no ONNX model";
  return null;
}

async function fetchOk(url) {
  const response = await fetch(url);
  if (!response.ok) throw new Error(`${url}: HTTP ${response.status}`);
  return response;
}

/** The bytes at `url`, reporting (received, total) to `onProgress` as they arrive. */
async function fetchBytes(url, onProgress) {
  const response = await fetchOk(url);
  const total = Number(response.headers.get("content-length")) || 0;
  const reader = response.body.getReader();
  const chunks = [];
  let received = 0;
  for (;;) {
    const { done, value } = await reader.read();
    if (done) break;
    chunks.push(value);
    received += value.length;
    onProgress?.(received, total);
  }
  const bytes = new Uint8Array(received);
  let offset = 0;
  for (const chunk of chunks) { bytes.set(chunk, offset); offset += chunk.length; }
  return bytes;
}

function sameIds(a, b, at) {
  for (let i = 0; i < b.length; i++) if (a[at + i] !== b[i]) return false;
  return true;
}

/** "webgpu" if `requested` allows it, the page ships the WebGPU build and the browser gives an adapter; else "wasm".
 * `requested`: "auto" (the default), "wasm" or "webgpu" (an error where WebGPU cannot run). */
async function chooseBackend(requested, base) {
  if (!["auto", "wasm", "webgpu"].includes(requested)) throw new Error(`backend ${requested}: choose auto, wasm or webgpu`);
  if (requested === "wasm") return "wasm";
  const packages = await (await fetchOk(new URL("vendor/packages.json", base))).json();
  let missing = null;
  if (!packages["onnxruntime-web"].files.includes(WEBGPU_BUILD)) missing = "this page was exported without --webgpu";
  else if (!navigator.gpu) missing = "this browser has no WebGPU (navigator.gpu)";
  else if (!(await navigator.gpu.requestAdapter())) missing = "this browser gives no WebGPU adapter";
  if (missing && requested === "webgpu") throw new Error(`WebGPU was asked for, but ${missing}.`);
  return missing ? "wasm" : "webgpu";
}

/** What every task's model shares: the bundle's cutting of texts into token ids, and one call of the model. */
class BundleModel {
  constructor(manifest, tokenizer, session, modelBytes, backend, ort) {
    this.manifest = manifest;
    this.backend = backend;  // "wasm" or "webgpu": where the session runs
    this.ort = ort;
    this.tokenizer = tokenizer;
    this.session = session;
    this.modelBytes = modelBytes;
    this.labels = manifest.labels;
    this.maxLength = manifest.max_length;
    this.truncation = manifest.truncation ?? "right";
    this.headTokens = manifest.head_tokens ?? 0;
    this.inputNames = manifest.input_names ?? ["input_ids", "attention_mask", "token_type_ids"];
  }

  /** Token ids of `text`, cut to max_length as the bundle says ('right', 'left' or 'head+tail'). */
  encode(text) {
    const full = this.tokenizer.encode(text).ids;
    if (full.length <= this.maxLength) return full;
    if (this.truncation === "head+tail") {  // edgetl.inputs.head_tail: [CLS] and the head, then the end
      const head = Math.min(this.headTokens, this.maxLength - 2) + 1;
      return full.slice(0, head).concat(full.slice(full.length - (this.maxLength - head)));
    }
    // As the tokenizers library truncates: the text's own tokens are cut, the special tokens around them stay.
    const bare = this.tokenizer.encode(text, { add_special_tokens: false }).ids;
    let start = 0;
    while (!sameIds(full, bare, start)) start++;
    const room = this.maxLength - (full.length - bare.length);
    const kept = this.truncation === "left" ? bare.slice(bare.length - room) : bare.slice(0, room);
    return full.slice(0, start).concat(kept, full.slice(start + bare.length));
  }

  /** The model's first output for one text (one call, as the Python runtime runs a dynamic-INT8 model); `ids`: the
   * text's token ids where the caller has them already. */
  async output(text, ids = this.encode(text)) {
    const n = ids.length;
    const columns = {
      input_ids: BigInt64Array.from(ids, BigInt),
      attention_mask: new BigInt64Array(n).fill(1n),
      token_type_ids: new BigInt64Array(n),
    };
    const feeds = {};
    for (const name of this.inputNames) feeds[name] = new this.ort.Tensor("int64", columns[name], [1, n]);
    const outputs = await this.session.run(feeds);
    return Array.from(outputs[this.session.outputNames[0]].data);
  }
}

export class TextClassifier extends BundleModel {
  /** The model's logits for one text. */
  logits(text) { return this.output(text); }

  /** {label, score, scores}: the label of the highest probability, that probability, and each label's. */
  async predict(text) {
    const logits = await this.output(text);
    const top = Math.max(...logits);
    const exp = logits.map((x) => Math.exp(x - top));
    const sum = exp.reduce((a, b) => a + b, 0);
    const probabilities = exp.map((e) => e / sum);
    const best = probabilities.indexOf(Math.max(...probabilities));
    const scores = Object.fromEntries(this.labels.map((label, i) => [label, probabilities[i]]));
    return { label: this.labels[best], score: probabilities[best], scores };
  }
}

export class Embedder extends BundleModel {
  constructor(...args) {
    super(...args);
    this.dimension = this.manifest.embedding.dimension;
  }

  /** The text's vector (pooled, and normalised where the bundle says, inside the model), as numbers. */
  async embed(text) {
    const vector = await this.output(text);
    if (vector.length !== this.dimension) throw new Error(`the model gives ${vector.length} values, edgetl.json says ${this.dimension}`);
    return vector;
  }

  /** The cosine of two vectors. */
  static cosine(a, b) {
    let dot = 0, aa = 0, bb = 0;
    for (let i = 0; i < a.length; i++) { dot += a[i] * b[i]; aa += a[i] * a[i]; bb += b[i] * b[i]; }
    return dot / Math.sqrt(aa * bb);
  }
}

/** A token classifier (named entities): it tags the text's whitespace-separated words, as the Python runtime's
 * `TokenClassifier.predict_words(text.split())` does: each word cut into tokens on its own, a word labelled by its
 * first token, adjacent words of one type joined into an entity unless the newcomer's tag starts with B- (Hugging
 * Face's aggregation "first"). Entities index into the text as typed. */
export class TokenTagger extends BundleModel {
  /** The text's words: [word, start, end] per run of non-space characters. */
  static words(text) {
    return Array.from(text.matchAll(/\S+/gu), (m) => [m[0], m.index, m.index + m[0].length]);
  }

  /** {ids, wordIds}: the words' tokens between the bundle's special tokens, cut on the right to max_length
   * (wordIds: each token's word, null for a special token). */
  encodeWords(words) {
    this.specials ??= this.#specials();
    const [before, after] = this.specials;
    const room = this.maxLength - before.length - after.length;
    const ids = [], wordIds = [];
    for (let w = 0; w < words.length && ids.length < room; w++) {
      for (const id of this.tokenizer.encode(words[w], { add_special_tokens: false }).ids) {
        if (ids.length === room) break;
        ids.push(id);
        wordIds.push(w);
      }
    }
    return { ids: before.concat(ids, after), wordIds: before.map(() => null).concat(wordIds, after.map(() => null)) };
  }

  /** The special tokens the tokenizer puts [before, after] a text's own (BERT: [CLS], [SEP]). */
  #specials() {
    const full = this.tokenizer.encode("a").ids, bare = this.tokenizer.encode("a", { add_special_tokens: false }).ids;
    let start = 0;
    while (!sameIds(full, bare, start)) start++;
    return [full.slice(0, start), full.slice(start + bare.length)];
  }

  encode(text) { return this.encodeWords(TokenTagger.words(text).map(([word]) => word)).ids; }

  /** {entities: [{type, score, start, end, text}]}: `text.slice(start, end)` is the entity's text. */
  async predict(text) {
    const words = TokenTagger.words(text);
    const { ids, wordIds } = this.encodeWords(words.map(([word]) => word));
    const flat = await this.output(text, ids);
    const width = this.labels.length;
    const tagged = [];  // [label, score, start, end] per word, from its first token
    for (let t = 0; t < wordIds.length; t++) {
      if (wordIds[t] === null || wordIds[t] === wordIds[t - 1]) continue;
      const row = flat.slice(t * width, (t + 1) * width);
      const top = Math.max(...row);
      const exp = row.map((x) => Math.exp(x - top));
      const best = exp.indexOf(1);
      const [, start, end] = words[wordIds[t]];
      tagged.push([this.labels[best], exp[best] / exp.reduce((a, b) => a + b, 0), start, end]);
    }
    const tag = (label) => (/^[BI]-/.test(label) ? [label[0], label.slice(2)] : ["I", label]);
    const groups = [];
    for (const word of tagged) {
      const [boundary, type] = tag(word[0]);
      const last = groups.at(-1);
      if (last && boundary !== "B" && type === tag(last.at(-1)[0])[1]) last.push(word);
      else groups.push([word]);
    }
    const entities = [];
    for (const group of groups) {
      const type = group[0][0].split("-").slice(1).join("-") || group[0][0];  // what follows the first '-'
      if (type === "O") continue;
      const start = group[0][2], end = group.at(-1)[3];
      const score = group.reduce((sum, word) => sum + word[1], 0) / group.length;
      entities.push({ type, score, start, end, text: text.slice(start, end) });
    }
    return { entities };
  }
}

/** The bundle exported beside this file, loaded; `onProgress(received, total)` follows the model download;
 * `backend`: "auto" (WebGPU where it can run, else WebAssembly), "wasm" or "webgpu". */
export async function load({ onProgress, backend = "auto" } = {}) {
  const base = new URL("./", import.meta.url);
  const manifest = await (await fetchOk(new URL("edgetl.json", base))).json();
  const problem = unsupported(manifest);
  if (problem) throw new Error(`This page cannot run this bundle: ${problem}.`);
  const chosen = await chooseBackend(backend, base);
  const ort = await import(new URL(`vendor/${chosen === "webgpu" ? WEBGPU_BUILD : "ort.wasm.min.mjs"}`, base).href);
  ort.env.wasm.wasmPaths = new URL("vendor/", base).href;
  // Threads need SharedArrayBuffer, which a browser gives only to a cross-origin-isolated page.
  ort.env.wasm.numThreads = self.crossOriginIsolated ? Math.min(navigator.hardwareConcurrency || 1, 4) : 1;
  const modelPath = manifest.models.onnx.path;
  const modelDir = modelPath.includes("/") ? modelPath.slice(0, modelPath.lastIndexOf("/") + 1) : "";
  const tokenizerJson = await (await fetchOk(new URL("tokenizer.json", base))).json();
  const config = await fetch(new URL(`${modelDir}tokenizer_config.json`, base));
  const tokenizer = new Tokenizer(tokenizerJson, config.ok ? await config.json() : {});
  const modelBytes = await fetchBytes(new URL(modelPath, base), onProgress);
  // Under WebGPU, the operations its provider lacks (the integer ones of a dynamic-INT8 model) run in WebAssembly.
  const providers = chosen === "webgpu" ? ["webgpu", "wasm"] : ["wasm"];
  const session = await ort.InferenceSession.create(modelBytes, { executionProviders: providers });
  const Task = { "sentence-embedding": Embedder, "token-classification": TokenTagger }[manifest.task] ?? TextClassifier;
  return new Task(manifest, tokenizer, session, modelBytes.length, chosen, ort);
}
