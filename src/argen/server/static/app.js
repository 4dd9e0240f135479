// argen's web page: a chat that shows what decoding did. No build step, no dependencies: it talks to
// this server only (/v1/argen/strategies for the controls, /v1/chat/completions streamed for the answers).
"use strict";

const $ = (id) => document.getElementById(id);
const KEY = "argen.apiKey"; // sessionStorage: kept while this tab is open
const state = { info: null, turns: [], controllers: [], busy: false };

// ---- the API -------------------------------------------------------------------------------
function headers() {
  const h = { "Content-Type": "application/json" };
  const key = sessionStorage.getItem(KEY);
  if (key) h.Authorization = "Bearer " + key;
  return h;
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: headers() });
  if (response.status === 401) {
    askKey();
    throw new Error("this server needs an API key: enter it, then try again");
  }
  if (!response.ok) {
    let message = response.status + " " + response.statusText;
    try { message = (await response.json()).error.message || message; } catch (_) { /* not JSON */ }
    throw new Error(message);
  }
  return response;
}

// Server-sent events from a fetch body (EventSource cannot POST or send a key).
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true }).replace(/\r\n/g, "\n");
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      const data = block.split("\n").filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trimStart()).join("\n");
      if (!data) continue;
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

// ---- the key ---------------------------------------------------------------------------------
function askKey() {
  const dialog = $("key-dialog");
  if (!dialog.open) dialog.showModal();
  $("key").focus();
}

$("key-form").addEventListener("submit", () => {
  sessionStorage.setItem(KEY, $("key").value.trim());
  $("key").value = "";
  loadInfo();
});
$("key-button").addEventListener("click", askKey);

// ---- the controls, from the server's own description ------------------------------------------
async function loadInfo() {
  try {
    state.info = await (await api("/v1/argen/strategies")).json();
  } catch (error) {
    showError(error.message);
    return;
  }
  showError("");
  const info = state.info;
  $("model").textContent = info.model;
  for (const [select, chosen] of [[$("strategy-a"), "plain"], [$("strategy-b"), "prompt-lookup"]]) {
    const previous = select.value || chosen;
    select.replaceChildren(...info.strategies.map((s) => new Option(`${s.name} (${s.exact ? "exact" : "lossy"})`, s.name)));
    select.value = info.strategies.some((s) => s.name === previous) ? previous : info.strategies[0].name;
  }
  const press = $("press");
  press.replaceChildren(new Option("none", ""), ...info.presses.map((p) => new Option(p.name, p.name)));
  $("max_tokens").max = info.max_tokens;
  $("max_tokens").value = Math.min(Number($("max_tokens").value) || 128, info.max_tokens);
  $("n").max = info.max_n;
  renderOptions("a");
  renderOptions("b");
  renderPressOptions();
  renderLegend();
}

function strategyInfo(which) {
  return state.info.strategies.find((s) => s.name === $("strategy-" + which).value);
}

function optionInput(prefix, option) {
  const id = `${prefix}-${option.name}`;
  const label = Object.assign(document.createElement("label"), { htmlFor: id, textContent: option.name });
  let input;
  if (option.type === "boolean") {
    input = Object.assign(document.createElement("input"), { type: "checkbox", checked: option.default === true });
  } else if (option.type === "model") {
    input = document.createElement("select");
    input.append(...option.choices.map((c) => new Option(c, c)));
    if (option.choices.includes(option.default)) input.value = option.default;
  } else if (option.type === "integer" || option.type === "number") {
    input = Object.assign(document.createElement("input"), { type: "number", step: option.type === "integer" ? "1" : "any" });
    // A default over this server's cap would be refused: start at the cap instead.
    if (option.default !== null) input.value = option.maximum !== null ? Math.min(option.default, option.maximum) : option.default;
    else input.placeholder = "default";
    if (option.maximum !== null) {
      input.max = option.maximum;
      label.textContent += ` (≤ ${option.maximum})`;
    }
  } else {
    input = Object.assign(document.createElement("input"), { type: "text", spellcheck: false });
    input.value = option.default === null ? "" : option.type === "string" ? option.default : JSON.stringify(option.default);
    if (option.type !== "string") input.placeholder = "JSON, e.g. [1, 2]";
    if (option.max_length !== null) {
      label.textContent += ` (≤ ${option.max_length} ${option.type === "string" ? "chars" : "entries"})`;
      if (option.type === "string") input.maxLength = option.max_length;
    }
  }
  input.id = id;
  input.dataset.option = option.name;
  return [label, input];
}

function renderInto(container, prefix, options) {
  const grid = document.createElement("div");
  grid.className = "grid";
  for (const option of options) grid.append(...optionInput(prefix, option));
  container.replaceChildren(...(options.length ? [grid] : []));
}

function renderOptions(which) {
  const info = strategyInfo(which);
  $(`strategy-${which}-about`).textContent = info.description;
  renderInto($("options-" + which), "opt-" + which, info.options);
}

function renderPressOptions() {
  const press = state.info.presses.find((p) => p.name === $("press").value);
  renderInto($("press-options"), "press-opt", press ? press.options : []);
  $("press").title = press ? press.description : "";
}

function renderLegend() {
  $("legend").replaceChildren(...Object.entries(state.info.origins).map(([origin, meaning]) => {
    const item = document.createElement("li");
    item.title = meaning;
    const swatch = document.createElement("span");
    swatch.className = `swatch tok o-${origin}`;
    swatch.setAttribute("aria-hidden", "true");
    item.append(swatch, origin);
    return item;
  }));
}

// The options the user changed from their defaults (the server fills in the rest).
function chosenOptions(container, options) {
  const out = {};
  for (const option of options) {
    const input = container.querySelector(`[data-option="${option.name}"]`);
    if (!input.checkValidity()) throw new Error(`${option.name}: ${input.validationMessage}`);
    let value;
    if (option.type === "boolean") value = input.checked;
    else if (option.type === "model") value = input.value;
    else if (input.value.trim() === "") continue;
    else if (option.type === "integer" || option.type === "number") value = Number(input.value);
    else if (option.type === "string") value = input.value;
    else {
      try { value = JSON.parse(input.value); } catch (_) { throw new Error(`${option.name}: not valid JSON`); }
      if (Array.isArray(value) && option.max_length !== null && value.length > option.max_length) {
        throw new Error(`${option.name}: at most ${option.max_length} entries on this server`);
      }
    }
    if (JSON.stringify(value) !== JSON.stringify(option.default)) out[option.name] = value;
  }
  return out;
}

function number(id) {
  const input = $(id);
  if (!input.checkValidity()) throw new Error(`${id}: ${input.validationMessage}`);
  return input.value.trim() === "" ? null : Number(input.value);
}

function requestBody(which, messages) {
  const strategy = strategyInfo(which);
  const body = {
    model: state.info.model,
    messages,
    stream: true,
    max_tokens: number("max_tokens"),
    temperature: number("temperature"),
    top_p: number("top_p"),
    n: number("n"),
    strategy: { name: strategy.name, ...chosenOptions($("options-" + which), strategy.options) },
    logprobs: true,
    top_logprobs: Math.min(5, state.info.max_top_logprobs),
    return_origins: true,
  };
  const seed = number("seed");
  if (seed !== null) body.seed = seed;
  const press = state.info.presses.find((p) => p.name === $("press").value);
  if (press) body.press = { name: press.name, ...chosenOptions($("press-options"), press.options) };
  const schema = $("schema").value.trim();
  if (schema) {
    let parsed;
    try { parsed = JSON.parse(schema); } catch (error) { throw new Error("the JSON schema is not valid JSON: " + error.message); }
    body.response_format = { type: "json_schema", json_schema: { name: "page_schema", schema: parsed } };
  }
  return body;
}

// ---- the conversation ------------------------------------------------------------------------
function history() {
  const messages = [];
  const system = $("system").value.trim();
  if (system) messages.push({ role: "system", content: system });
  for (const turn of state.turns) messages.push({ role: turn.role, content: turn.content });
  return messages;
}

function render() {
  const conversation = $("conversation");
  conversation.replaceChildren(...state.turns.map((turn) => {
    if (turn.role === "user") {
      const div = document.createElement("div");
      div.className = "turn user";
      div.textContent = turn.content;
      return div;
    }
    return turn.element;
  }));
  conversation.scrollTop = conversation.scrollHeight;
  $("regenerate").disabled = state.busy || !state.turns.some((t) => t.role === "user");
}

function setBusy(busy) {
  state.busy = busy;
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  render();
}

async function send(text) {
  if (state.busy || !state.info) return;
  if (text !== null) state.turns.push({ role: "user", content: text });
  const messages = history();
  const runs = ["a", ...($("side-by-side").checked ? ["b"] : [])];
  let bodies;
  try {
    bodies = runs.map((which) => requestBody(which, messages));
  } catch (error) {
    if (text !== null) state.turns.pop();
    showError(error.message);
    return;
  }
  showError("");
  const element = document.createElement("div");
  element.className = "turn assistant";
  const columns = document.createElement("div");
  columns.className = "columns";
  element.append(columns);
  const turn = { role: "assistant", content: "", element };
  state.turns.push(turn);
  setBusy(true);
  const results = await Promise.all(bodies.map((body) => stream(body, columns)));
  turn.content = results[0];
  setBusy(false);
  $("status").textContent = "Answer complete.";
  $("prompt").focus();
}

// One request, streamed into a column of its own; returns the first choice's text.
async function stream(body, columns) {
  const column = document.createElement("section");
  column.className = "column";
  const title = document.createElement("h3");
  title.textContent = body.strategy.name;
  column.setAttribute("aria-label", "Answer from " + body.strategy.name);
  column.append(title);
  columns.append(column);
  const choices = [];
  const choice = (index) => choices[index] || (choices[index] = newChoice(column, body.strategy.name, index, body.n > 1));
  const controller = new AbortController();
  state.controllers.push(controller);
  const started = performance.now();
  try {
    const response = await api("/v1/chat/completions", { method: "POST", body: JSON.stringify(body), signal: controller.signal });
    for await (const chunk of events(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      for (const c of chunk.choices || []) addTokens(choice(c.index), c, started);
      if (chunk.argen_stats) finalStats(choice(chunk.argen_stats.index), chunk.argen_stats);
    }
  } catch (error) {
    if (error.name === "AbortError") choices.forEach((c) => (c.note.textContent = "stopped"));
    else showError(error.message);
  } finally {
    state.controllers = state.controllers.filter((c) => c !== controller);
  }
  return choices[0] ? choices[0].text : "";
}

function newChoice(column, strategy, index, several) {
  const output = document.createElement("div");
  output.className = "output";
  output.tabIndex = 0;
  output.setAttribute("role", "group");
  output.setAttribute("aria-label", `${strategy} answer${several ? " " + (index + 1) : ""}: arrow keys move between tokens`);
  const stats = document.createElement("dl");
  stats.className = "stats";
  const tools = document.createElement("div");
  tools.className = "tools";
  const copy = Object.assign(document.createElement("button"), { type: "button", textContent: "Copy" });
  copy.setAttribute("aria-label", `Copy the ${strategy} answer`);
  const note = document.createElement("span");
  note.className = "muted";
  tools.append(copy, note);
  column.append(output, stats, tools);
  const choice = { output, stats, note, text: "", tokens: 0, drafts: 0, values: {} };
  copy.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(choice.text); note.textContent = "copied"; } catch (_) { note.textContent = "copy refused by the browser"; }
  });
  return choice;
}

// A chunk's text split over its tokens: each token's own text where the chunk's text starts with it
// (a token whose bytes complete in a later token's character shows as an empty dot).
function splitText(content, records, count) {
  const parts = [];
  let rest = content;
  for (let i = 0; i < count; i++) {
    const token = records && records[i] ? records[i].token : null;
    if (i === count - 1) parts.push(rest);
    else if (token && !token.startsWith("bytes:") && rest.startsWith(token)) {
      parts.push(token);
      rest = rest.slice(token.length);
    } else parts.push("");
  }
  return parts;
}

function addTokens(choice, c, started) {
  const content = (c.delta && c.delta.content) || "";
  const origins = c.token_origins || (content ? [""] : []);
  const records = c.logprobs && c.logprobs.content;
  const parts = splitText(content, records, origins.length);
  origins.forEach((origin, i) => {
    const span = document.createElement("span");
    span.className = `tok o-${origin || "unknown"}` + (parts[i] ? "" : " empty");
    span.textContent = parts[i];
    span.tabIndex = -1;
    span.dataset.origin = origin;
    if (records && records[i]) span.dataset.record = JSON.stringify(records[i]);
    choice.output.append(span);
  });
  choice.text += content;
  choice.tokens += origins.length;
  choice.drafts += origins.filter((o) => o === "draft").length;
  const seconds = (performance.now() - started) / 1000;
  setStats(choice, {
    tokens: choice.tokens,
    "tokens/s": seconds > 0 ? (choice.tokens / seconds).toFixed(1) : "–",
    "draft tokens": choice.drafts,
  });
  if (c.finish_reason) choice.note.textContent = "finished: " + c.finish_reason;
}

function finalStats(choice, s) {
  const rate = s.draft_tokens_proposed ? ((100 * s.draft_tokens_accepted) / s.draft_tokens_proposed).toFixed(0) + "%" : "–";
  choice.stats.classList.add("final");
  setStats(choice, {
    tokens: s.new_tokens,
    "tokens/s": s.tokens_per_s.toFixed(1),
    "tokens/pass": s.tokens_per_forward.toFixed(2),
    acceptance: rate,
    "draft tokens": `${s.draft_tokens_accepted}/${s.draft_tokens_proposed}`,
    "forward passes": s.forward_passes,
    "KV held": bytes(s.kv_bytes_held),
    "cached prompt": s.cached_prompt_tokens + " tok",
  });
}

function setStats(choice, values) {
  Object.assign(choice.values, values);
  choice.stats.replaceChildren(...Object.entries(choice.values).map(([name, value]) => {
    const row = document.createElement("div");
    row.dataset.stat = name;
    row.append(Object.assign(document.createElement("dt"), { textContent: name }), Object.assign(document.createElement("dd"), { textContent: value }));
    return row;
  }));
}

function bytes(n) {
  return n >= 1 << 20 ? (n / (1 << 20)).toFixed(1) + " MiB" : n >= 1024 ? (n / 1024).toFixed(0) + " KiB" : n + " B";
}

// ---- a token's details, on hover or focus ------------------------------------------------------
function showTip(span) {
  const tip = $("tip");
  const origin = span.dataset.origin;
  tip.replaceChildren();
  const line = (text) => tip.append(Object.assign(document.createElement("div"), { textContent: text }));
  const record = span.dataset.record ? JSON.parse(span.dataset.record) : null;
  const text = record ? record.token : span.textContent; // a byte token's text is "bytes:\\xNN"
  line(`${JSON.stringify(text)} · ${origin}: ${state.info.origins[origin] || "origin not reported"}`);
  if (record) {
    line(`log-prob ${record.logprob.toFixed(3)} (p = ${(100 * Math.exp(record.logprob)).toFixed(1)}%)`);
    const table = document.createElement("table");
    for (const alt of record.top_logprobs || []) {
      const row = table.insertRow();
      row.insertCell().textContent = JSON.stringify(alt.token);
      row.insertCell().textContent = alt.logprob.toFixed(3);
    }
    tip.append(table);
  }
  const box = span.getBoundingClientRect();
  tip.hidden = false;
  tip.style.left = Math.min(box.left, window.innerWidth - tip.offsetWidth - 8) + "px";
  tip.style.top = (box.bottom + tip.offsetHeight + 8 < window.innerHeight ? box.bottom + 4 : box.top - tip.offsetHeight - 4) + "px";
  span.setAttribute("aria-describedby", "tip");
}

function hideTip(span) {
  $("tip").hidden = true;
  if (span) span.removeAttribute("aria-describedby");
}

const conversation = $("conversation");
conversation.addEventListener("mouseover", (e) => e.target.classList.contains("tok") && showTip(e.target));
conversation.addEventListener("mouseout", (e) => e.target.classList.contains("tok") && e.target !== document.activeElement && hideTip(e.target));
conversation.addEventListener("click", (e) => e.target.classList.contains("tok") && e.target.focus()); // details stay
conversation.addEventListener("focusin", (e) => e.target.classList.contains("tok") && showTip(e.target));
conversation.addEventListener("focusout", (e) => e.target.classList.contains("tok") && hideTip(e.target));
// Arrow keys walk the tokens of an answer (Tab moves between answers, not through every token).
conversation.addEventListener("keydown", (e) => {
  const output = e.target.closest(".output");
  if (!output) return;
  if (e.key === "Escape") return hideTip(e.target);
  if (e.key !== "ArrowRight" && e.key !== "ArrowLeft") return;
  const tokens = [...output.querySelectorAll(".tok")];
  const at = tokens.indexOf(e.target);
  const next = e.key === "ArrowRight" ? (at < 0 ? 0 : at + 1) : at < 0 ? tokens.length - 1 : at - 1;
  if (tokens[next]) {
    e.preventDefault();
    tokens[next].focus();
  }
});

// ---- wiring -----------------------------------------------------------------------------------
function showError(message) {
  $("error").textContent = message;
}

$("composer").addEventListener("submit", (e) => {
  e.preventDefault();
  const text = $("prompt").value.trim();
  if (!text || state.busy) return;
  $("prompt").value = "";
  send(text);
});
$("prompt").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
    e.preventDefault();
    $("composer").requestSubmit();
  }
});
$("stop").addEventListener("click", () => state.controllers.forEach((c) => c.abort()));
$("regenerate").addEventListener("click", () => {
  if (state.busy) return;
  while (state.turns.length && state.turns[state.turns.length - 1].role === "assistant") state.turns.pop();
  send(null);
});
$("clear").addEventListener("click", () => {
  if (state.busy) return;
  state.turns = [];
  render();
});
$("strategy-a").addEventListener("change", () => renderOptions("a"));
$("strategy-b").addEventListener("change", () => renderOptions("b"));
$("press").addEventListener("change", renderPressOptions);
$("side-by-side").addEventListener("change", (e) => ($("b-controls").hidden = !e.target.checked));
$("controls").addEventListener("submit", (e) => e.preventDefault());

loadInfo();
