// The clinician page: a client of the public API like any other (no build step, no CDN).
"use strict";

const $ = (id) => document.getElementById(id);
let image = null; // the chosen File
let schema = null; // the chosen model's public manifest

function headers() {
  const key = $("key").value.trim();
  sessionStorage.setItem("endofuse-key", key); // this tab only
  return key ? { "X-API-Key": key } : {};
}

async function api(path, options = {}) {
  const response = await fetch(path, { ...options, headers: { ...headers(), ...(options.headers || {}) } });
  const body = await response.json().catch(() => ({}));
  if (!response.ok) {
    const message = body.error && (body.error.message || body.error) || response.statusText;
    throw new Error(`${response.status}: ${message}`);
  }
  return body;
}

function status(text, isError = false) {
  $("status").textContent = text;
  $("status").className = isError ? "error" : "";
}

async function loadModels() {
  try {
    const listing = await api("/models");
    const names = listing.models.map((m) => m.name);
    const keep = names.includes($("model").value) ? $("model").value : listing.default;
    $("model").replaceChildren(...listing.models.map((m) => new Option(
      `${m.name} (v${m.latest})`, m.name, false, m.name === keep)));
    await loadSchema();
    status("");
  } catch (err) {
    status(`Could not list the models: ${err.message}`, true);
  }
}

async function loadSchema() {
  const name = $("model").value;
  const latest = (await api(`/models/${encodeURIComponent(name)}`)).latest;
  if ($("model").value !== name) return; // another model was chosen meanwhile
  schema = latest;
  const levels = (schema.decision && schema.decision.levels) || [];
  $("coverage").replaceChildren(...levels.map((l) => new Option(`${Math.round(l * 100)} %`, l, false, l === 0.9)));
  $("coverage").disabled = levels.length === 0;
  // Marginal sets exist only where the manifest fitted them.
  const marginal = Boolean(schema.decision && schema.decision.marginal_thresholds);
  if (!marginal) $("sets").value = "class";
  $("sets").disabled = !marginal;
  const fields = (schema.tabular && schema.tabular.fields) || [];
  $("tabular").hidden = fields.length === 0;
  $("fields").replaceChildren(...fields.map(fieldInput));
}

function fieldInput(field) {
  const label = document.createElement("label");
  label.textContent = field.unit ? `${field.name} (${field.unit})` : field.name;
  let input;
  if (field.type === "categorical") {
    input = document.createElement("select");
    input.append(new Option("(not recorded)", ""), ...field.categories.map((c) => new Option(c, c)));
  } else {
    input = document.createElement("input");
    input.type = "number";
    input.step = "any";
    if (field.min !== null && field.min !== undefined) input.min = field.min;
    if (field.max !== null && field.max !== undefined) input.max = field.max;
    input.placeholder = "(not recorded)";
  }
  input.dataset.field = field.name;
  input.dataset.kind = field.type;
  label.append(input);
  return label;
}

function tabularValues() {
  const values = {};
  for (const input of $("fields").querySelectorAll("[data-field]")) {
    if (input.value === "") continue;
    values[input.dataset.field] = input.dataset.kind === "numeric" ? Number(input.value) : input.value;
  }
  return values;
}

function choose(file) {
  if (!file) return;
  image = file;
  $("preview").src = URL.createObjectURL(file);
  $("preview").hidden = false;
}

async function submit(event) {
  event.preventDefault();
  const model = encodeURIComponent($("model").value);
  const params = new URLSearchParams();
  if (!$("coverage").disabled) params.set("coverage", $("coverage").value);
  if (!$("sets").disabled) params.set("sets", $("sets").value);
  const query = params.toString() ? `?${params}` : "";
  const tabular = tabularValues();
  let options;
  if (image) {
    const form = new FormData();
    form.append("image", image, "frame");
    if (Object.keys(tabular).length) form.append("tabular", JSON.stringify(tabular));
    options = { method: "POST", body: form };
  } else {
    options = { method: "POST", body: JSON.stringify({ tabular }), headers: { "Content-Type": "application/json" } };
  }
  $("submit").disabled = true;
  status("Predicting…");
  try {
    show(await api(`/models/${model}/predict${query}`, options));
    status("");
  } catch (err) {
    status(err.message, true);
  } finally {
    $("submit").disabled = false;
  }
}

function show(result) {
  $("result").hidden = false;
  $("model-used").textContent = `${result.model.name} v${result.model.version}`;
  $("label").textContent = result.label;
  // A balanced label rule names a rare class on weaker evidence than a common one.
  $("label-rule").textContent = result.label_rule === "balanced"
    ? "Suggested (rare diagnoses weighted by their rarity)" : "Most probable";
  const set = result.prediction_set || [result.label];
  $("set").textContent = set.join(", ");
  const each = result.sets === "marginal" ? "on average over cases" : "for every diagnosis";
  $("coverage-got").textContent = result.coverage
    ? `${Math.round(result.coverage * 100)} % coverage ${each}`
    : "coverage (not fitted)";
  const flags = [];
  if (result.ood && result.ood.flagged) flags.push(["ood", "Out of distribution: not the kind of image the model was built for" + valFlagged(result.ood.val_flagged)]);
  if (result.refer) flags.push(["refer", `Refer to a clinician: ${result.reason}`]);
  if (!flags.length) flags.push(["ok", "No referral flag"]);
  $("flags").replaceChildren(...flags.map(([kind, text]) => {
    const span = document.createElement("span");
    span.className = `flag ${kind}`;
    span.textContent = text;
    return span;
  }));
  const ranked = Object.entries(result.probabilities).sort((a, b) => b[1] - a[1]);
  $("bars").replaceChildren(...ranked.map(([name, p]) => {
    const row = document.createElement("div");
    row.className = set.includes(name) ? "bar in-set" : "bar";
    row.dataset.label = name;
    row.innerHTML = '<span class="name"></span><div class="track"><div class="fill"></div></div><span class="value"></span>';
    row.querySelector(".name").textContent = name;
    row.querySelector(".fill").style.width = `${(p * 100).toFixed(1)}%`;
    row.querySelector(".value").textContent = `${(p * 100).toFixed(1)} %`;
    return row;
  }));
  const tab = result.modalities.tabular;
  const parts = [`image: ${result.modalities.image ? "used" : "not sent"}`];
  if (tab) parts.push(`fields used: ${tab.used.join(", ") || "none"}`, `missing: ${tab.missing.join(", ") || "none"}`);
  $("inputs").textContent = parts.join(" · ");
  $("warnings").replaceChildren(...result.warnings.map((w) => Object.assign(document.createElement("li"), { textContent: w })));
}

// How often the flag marked validation images (all of the kind the model was built for) that
// the model named the same: a flag on a label it often marks is weaker evidence.
function valFlagged(v) {
  if (!v || !v.of) return "";
  const pct = (x) => `${(100 * x).toFixed(1)} %`;
  return `. Of the validation images named ${v.label}, it marked ${v.flagged} of ${v.of} ` +
    `(${pct(v.share)}; ${pct(v.share_all_labels)} over every label)`;
}

$("key").value = sessionStorage.getItem("endofuse-key") || "";
$("key").addEventListener("change", loadModels);
$("model").addEventListener("change", () => loadSchema().catch((e) => status(e.message, true)));
$("file").addEventListener("change", (e) => choose(e.target.files[0]));
$("drop").addEventListener("dragover", (e) => { e.preventDefault(); $("drop").classList.add("over"); });
$("drop").addEventListener("dragleave", () => $("drop").classList.remove("over"));
$("drop").addEventListener("drop", (e) => {
  e.preventDefault();
  $("drop").classList.remove("over");
  choose(e.dataTransfer.files[0]);
});
$("ask").addEventListener("submit", submit);
loadModels();
