// The annotation page: sign in, one item per screen, keyboard first. Every save goes to the server at
// once; unsaved text is kept as a draft in this browser, so a reload or a crash loses nothing typed.
"use strict";

const $ = (id) => document.getElementById(id);
const VERDICT_KEYS = { 1: "correct", 2: "incorrect", 3: "no_answer" };
const IDLE_MS = 60000; // a pause longer than this is not annotation time
const state = {
  info: null,
  annotator: null,
  queue: [],
  progress: null,
  item: null,
  templates: {},
  verdict: null,
  lastTemplate: null,
  pending: {},
  lastActivity: performance.now(),
};

// -- the API ----------------------------------------------------------------------------------------
async function api(method, path, body) {
  const options = { method, headers: {} };
  if (body !== undefined) {
    options.headers["Content-Type"] = "application/json";
    options.body = JSON.stringify(body);
  }
  let response;
  try {
    response = await fetch(path, options);
  } catch (err) {
    return { ok: false, status: 0, data: { error: "the server does not answer (is it running?)" } };
  }
  let data;
  try {
    data = await response.json();
  } catch (err) {
    data = { error: `${response.status} ${response.statusText}` };
  }
  return { ok: response.ok, status: response.status, data };
}

const itemPath = (id) => `/api/annotators/${encodeURIComponent(state.annotator)}/items/${encodeURIComponent(id)}`;

// -- start, sign in ---------------------------------------------------------------------------------
async function start() {
  const info = await api("GET", "/api/info");
  if (!info.ok) return fatal(info.data.error);
  state.info = info.data;
  const per = state.info.per_item > 1 ? `, ${state.info.per_item} annotators each` : "";
  $("batch").textContent = `${state.info.batch} (${state.info.items} items${per})`;
  loadTemplates();
  const remembered = localStorage.getItem("laffi.annotator");
  if (remembered) await signIn(remembered);
  else showSignIn();
}

function fatal(text) {
  $("fatal").textContent = text;
  $("fatal").hidden = false;
}

function showSignIn(error) {
  for (const id of ["item", "progress", "who", "open-list"]) $(id).hidden = true;
  $("signin").hidden = false;
  $("signin-error").hidden = !error;
  $("signin-error").textContent = error || "";
  $("annotator").value = state.annotator || localStorage.getItem("laffi.annotator") || "";
  $("annotator").focus();
}

async function signIn(id) {
  const result = await api("POST", "/api/signin", { annotator: id });
  if (!result.ok) return showSignIn(result.data.error);
  state.annotator = result.data.annotator;
  localStorage.setItem("laffi.annotator", state.annotator);
  $("who-name").textContent = state.annotator;
  $("signin").hidden = true;
  for (const id of ["progress", "who", "open-list"]) $(id).hidden = false;
  await refreshQueue();
  const fromHash = decodeURIComponent((location.hash.match(/^#item=(.*)$/) || [])[1] || "");
  const first =
    state.queue.find((q) => q.id === fromHash) || state.queue.find((q) => q.status === "open") || state.queue[0];
  if (first) await openItem(first.id);
  else message("Nothing to annotate: every item has its annotators.", "ok");
}

function signOut() {
  localStorage.removeItem("laffi.annotator");
  state.annotator = null;
  state.item = null;
  history.replaceState(null, "", location.pathname + location.search);
  showSignIn();
}

// -- the queue, progress and the list ---------------------------------------------------------------
async function refreshQueue() {
  const result = await api("GET", `/api/annotators/${encodeURIComponent(state.annotator)}/queue`);
  if (!result.ok) return message(result.data.error, "error");
  state.queue = result.data.items;
  state.progress = result.data.progress;
  renderProgress();
  renderList();
}

function renderProgress() {
  const p = state.progress;
  const done = p.saved + p.flagged;
  $("bar-fill").style.width = `${p.assigned ? (100 * done) / p.assigned : 0}%`;
  $("bar").setAttribute("aria-valuemax", String(p.assigned));
  $("bar").setAttribute("aria-valuenow", String(done));
  $("progress-text").textContent =
    `${done}/${p.assigned} done` +
    (p.flagged ? ` (${p.flagged} flagged)` : "") +
    ` · batch ${p.batch_complete}/${p.batch_items} complete`;
}

function renderList() {
  const rows = state.queue.map((q, i) => {
    const tr = document.createElement("tr");
    tr.tabIndex = 0;
    tr.dataset.id = q.id;
    if (state.item && q.id === state.item.id) tr.className = "current";
    const badge = document.createElement("span");
    badge.className = `badge ${q.status}`;
    badge.textContent = q.status;
    for (const content of [String(i + 1), q.question, badge, q.verdict || ""]) {
      const td = document.createElement("td");
      td.append(content);
      tr.append(td);
    }
    return tr;
  });
  $("list-body").replaceChildren(...rows);
  $("list-summary").textContent = `(${state.queue.length})`;
}

function openList() {
  renderList();
  $("list").showModal();
  const current = $("list-body").querySelector("tr.current") || $("list-body").querySelector("tr");
  if (current) current.focus();
}

async function pickFromList(event) {
  const row = event.target.closest("tr");
  if (!row || (event.type === "keydown" && event.key !== "Enter")) return;
  event.preventDefault();
  $("list").close();
  await openItem(row.dataset.id);
}

// -- one item ---------------------------------------------------------------------------------------
async function openItem(id, note = "") {
  const result = await api("GET", itemPath(id));
  if (!result.ok) return message(result.data.error, "error");
  state.item = result.data;
  state.verdict = null;
  state.lastTemplate = null;
  history.replaceState(null, "", `#item=${encodeURIComponent(id)}`);
  renderItem();
  const draft = readDraft(id);
  const saved = state.item.annotation;
  if (
    draft &&
    draft.revision === saved.revision &&
    (draft.feedback !== saved.feedback || draft.correction !== saved.correction)
  ) {
    $("feedback").value = draft.feedback;
    $("correction").value = draft.correction;
    message("Unsaved draft restored from this browser: save it (Ctrl+S) to keep it.", "warn");
  } else {
    if (draft) clearDraft(id); // written against an older save: the server's text wins
    message(note, "ok");
  }
  if (document.activeElement && document.activeElement !== document.body) document.activeElement.blur();
}

function renderItem() {
  const item = state.item;
  const position = state.queue.findIndex((q) => q.id === item.id);
  $("item").hidden = false;
  $("position").textContent = `Item ${position + 1} of ${state.queue.length}`;
  $("item-id").textContent = item.id;
  $("question").textContent = item.question;
  const prediction = $("prediction");
  prediction.className = item.no_answer ? "badge no-answer" : "prediction";
  prediction.textContent = item.no_answer ? "no answer" : item.prediction;
  $("not-found").hidden = item.no_answer || item.span !== null;
  $("gold").hidden = item.gold === null;
  $("gold-text").textContent = item.gold || "";
  const passage = $("passage");
  if (item.span) {
    const mark = document.createElement("mark");
    mark.textContent = item.context.slice(item.span[0], item.span[1]);
    mark.title = "the model's answer";
    passage.replaceChildren(item.context.slice(0, item.span[0]), mark, item.context.slice(item.span[1]));
  } else {
    passage.replaceChildren(item.context);
  }
  $("feedback").value = item.annotation.feedback;
  $("correction").value = item.annotation.correction;
  renderStatus();
  renderList();
}

function renderStatus() {
  const a = state.item.annotation;
  const status = $("status");
  status.className = `badge ${a.status}`;
  status.textContent =
    a.status === "open" ? "new" : a.status === "saved" ? `saved (revision ${a.revision})` : "flagged as unclear";
  const reads = a.reads_as;
  $("reads-as").textContent =
    a.status === "saved" && reads.verdict
      ? `The pipeline reads the saved text as: ${reads.verdict}` +
        (reads.correction === null ? "" : reads.correction === "" ? " (no answer)" : ` → “${reads.correction}”`) +
        (reads.verdict === "unknown" ? ". Start with Correct or Incorrect so that it reads a verdict." : "")
      : "";
}

function move(step) {
  if (!state.item) return;
  const i = state.queue.findIndex((q) => q.id === state.item.id);
  const next = state.queue[i + step];
  if (next) return openItem(next.id);
  message(step > 0 ? "This is your last item." : "This is your first item.", "ok");
}

async function nextOpen(note) {
  const i = state.queue.findIndex((q) => q.id === state.item.id);
  const after = state.queue.slice(i + 1).concat(state.queue.slice(0, i + 1));
  const next = state.queue[i + 1] || after.find((q) => q.status === "open");
  if (next && next.id !== state.item.id) return openItem(next.id, note);
  message(`${note} All your items are done: thank you. The list (l) takes you back to any of them.`, "ok");
}

// -- templates, the correction, span selection --------------------------------------------------------
function loadTemplates() {
  let mine = {};
  try {
    mine = JSON.parse(localStorage.getItem("laffi.templates") || "{}");
  } catch (err) {
    mine = {};
  }
  state.templates = { ...state.info.templates, ...mine };
  for (const input of document.querySelectorAll("[data-template]"))
    input.value = state.templates[input.dataset.template];
}

function editTemplate(event) {
  state.templates[event.target.dataset.template] = event.target.value;
  localStorage.setItem("laffi.templates", JSON.stringify(state.templates));
}

function resetTemplates() {
  localStorage.removeItem("laffi.templates");
  loadTemplates();
}

function fillTemplate(verdict) {
  const correction = $("correction").value.trim().replaceAll('"', "'"); // a double quote would end the quoted answer
  const prediction = state.item.no_answer ? "no answer" : state.item.prediction;
  const text = state.templates[verdict].replaceAll("{correction}", correction).replaceAll("{prediction}", prediction);
  $("feedback").value = text;
  state.lastTemplate = text;
  keepDraft();
}

function applyVerdict(verdict) {
  if (!state.item) return;
  state.verdict = verdict;
  fillTemplate(verdict);
  if (verdict === "incorrect" && !$("correction").value.trim()) {
    $("correction").focus();
    message("Type the correction (or select it in the passage), then Enter.", "");
  } else {
    focusFeedback();
  }
}

function focusFeedback() {
  const box = $("feedback");
  box.focus();
  box.setSelectionRange(box.value.length, box.value.length);
}

function correctionChanged() {
  // The feedback follows the correction while it is still the template's text (not the annotator's own).
  const untouched = !$("feedback").value.trim() || $("feedback").value === state.lastTemplate;
  if (untouched && $("correction").value.trim()) {
    state.verdict = "incorrect";
    fillTemplate("incorrect");
  }
  keepDraft();
}

function useSelection() {
  const selection = window.getSelection();
  const passage = $("passage");
  if (
    !selection ||
    selection.isCollapsed ||
    !passage.contains(selection.anchorNode) ||
    !passage.contains(selection.focusNode)
  ) {
    return false;
  }
  const text = selection.toString().replace(/\s+/g, " ").trim();
  if (!text) return false;
  $("correction").value = text;
  correctionChanged();
  message(`Correction from the passage: “${text}”`, "ok");
  return true;
}

// -- saving -----------------------------------------------------------------------------------------
async function save(status, thenNext) {
  const item = state.item;
  if (!item) return;
  activity();
  const body = {
    revision: item.annotation.revision,
    feedback: $("feedback").value,
    correction: $("correction").value,
    seconds: Math.round((state.pending[item.id] || 0) * 10) / 10,
    status,
  };
  const result = await api("PUT", itemPath(item.id), body);
  if (result.status === 409) return showConflict(result.data);
  if (!result.ok) return message(result.data.error, "error");
  state.pending[item.id] = 0;
  clearDraft(item.id);
  item.annotation = result.data.annotation;
  renderStatus();
  await refreshQueue();
  const note =
    status === "saved"
      ? `Saved ${item.id} (revision ${item.annotation.revision}).`
      : `Flagged ${item.id} as unclear: it stays in your list.`;
  if (thenNext) await nextOpen(note);
  else message(note, "ok");
}

function showConflict(data) {
  const box = $("message");
  box.className = "message error";
  const load = button("Load the saved version (drop mine)", () => {
    state.item.annotation = data.current;
    $("feedback").value = data.current.feedback;
    $("correction").value = data.current.correction;
    clearDraft(state.item.id);
    renderStatus();
    message("Loaded the saved version.", "ok");
  });
  const overwrite = button("Save mine over it", () => {
    state.item.annotation.revision = data.current.revision; // deliberate: the replaced text stays in the edit history
    return save("saved", false);
  });
  box.replaceChildren(`${data.error}. `, load, " ", overwrite);
}

function button(text, onClick) {
  const b = document.createElement("button");
  b.type = "button";
  b.textContent = text;
  b.addEventListener("click", onClick);
  return b;
}

function message(text, kind) {
  const box = $("message");
  box.className = `message ${kind || ""}`;
  box.textContent = text;
}

// -- drafts in this browser (unsaved text survives a reload) --------------------------------------------
const draftKey = (id) => `laffi.draft.${state.info.batch_fingerprint}.${state.annotator}.${id}`;

function keepDraft() {
  if (!state.item) return;
  const draft = {
    feedback: $("feedback").value,
    correction: $("correction").value,
    revision: state.item.annotation.revision,
  };
  localStorage.setItem(draftKey(state.item.id), JSON.stringify(draft));
}

function readDraft(id) {
  try {
    return JSON.parse(localStorage.getItem(draftKey(id)) || "null");
  } catch (err) {
    return null;
  }
}

const clearDraft = (id) => localStorage.removeItem(draftKey(id));

// -- active time: counted between input events closer than IDLE_MS, while the page is visible -----------
function activity() {
  const t = performance.now();
  if (state.item && document.visibilityState === "visible" && t - state.lastActivity < IDLE_MS) {
    state.pending[state.item.id] = (state.pending[state.item.id] || 0) + (t - state.lastActivity) / 1000;
  }
  state.lastActivity = t;
}

function visibilityChanged() {
  if (document.visibilityState === "hidden")
    activity(); // up to now it was visible
  else state.lastActivity = performance.now(); // the hidden time is not counted
}

// -- keys -------------------------------------------------------------------------------------------
const KEYS = {
  1: () => applyVerdict("correct"),
  2: () => applyVerdict("incorrect"),
  3: () => applyVerdict("no_answer"),
  j: () => move(1),
  ArrowRight: () => move(1),
  k: () => move(-1),
  ArrowLeft: () => move(-1),
  c: () => $("correction").focus(),
  f: () => focusFeedback(),
  s: () => useSelection() || message("Select a span of the passage first.", "warn"),
  u: () => save("flagged", true),
  l: () => openList(),
  "?": () => $("help").showModal(),
};

function onKey(event) {
  if (!state.item || $("item").hidden || $("list").open || $("help").open) return; // dialogs: Esc, Tab, Enter
  const target = event.target;
  const inField =
    target instanceof HTMLElement &&
    (["INPUT", "TEXTAREA", "SELECT"].includes(target.tagName) || target.isContentEditable);
  const mod = event.ctrlKey || event.metaKey;
  const digit = /^Digit([123])$/.exec(event.code);
  if (mod && event.key === "Enter") return consume(event, () => save("saved", true));
  if (mod && event.key.toLowerCase() === "s") return consume(event, () => save("saved", false));
  if (event.altKey && digit) return consume(event, () => applyVerdict(VERDICT_KEYS[digit[1]]));
  if (inField) {
    if (event.key === "Escape") target.blur();
    if (target.id === "correction" && event.key === "Enter") {
      consume(event, () => {
        if ($("correction").value.trim()) correctionChanged();
        focusFeedback();
      });
    }
    return;
  }
  if (mod || event.altKey || !(event.key in KEYS)) return;
  consume(event, KEYS[event.key]);
}

function consume(event, action) {
  event.preventDefault();
  action();
}

// -- wiring -----------------------------------------------------------------------------------------
function wire() {
  $("signin-form").addEventListener("submit", (event) => {
    event.preventDefault();
    signIn($("annotator").value.trim());
  });
  $("sign-out").addEventListener("click", signOut);
  $("open-list").addEventListener("click", openList);
  $("open-help").addEventListener("click", () => $("help").showModal());
  $("list-body").addEventListener("click", pickFromList);
  $("list-body").addEventListener("keydown", pickFromList);
  for (const b of document.querySelectorAll("[data-verdict]"))
    b.addEventListener("click", () => applyVerdict(b.dataset.verdict));
  $("prev").addEventListener("click", () => move(-1));
  $("next").addEventListener("click", () => move(1));
  $("flag").addEventListener("click", () => save("flagged", true));
  $("save").addEventListener("click", () => save("saved", false));
  $("save-next").addEventListener("click", () => save("saved", true));
  $("correction").addEventListener("input", correctionChanged);
  $("feedback").addEventListener("input", keepDraft);
  $("passage").addEventListener("mouseup", useSelection);
  for (const input of document.querySelectorAll("[data-template]")) input.addEventListener("input", editTemplate);
  $("reset-templates").addEventListener("click", resetTemplates);
  document.addEventListener("keydown", onKey);
  for (const name of ["keydown", "mousedown", "mousemove", "wheel", "input", "touchstart"]) {
    document.addEventListener(name, activity, { capture: true, passive: true }); // before the handlers move on
  }
  document.addEventListener("visibilitychange", visibilityChanged);
}

wire();
start();
