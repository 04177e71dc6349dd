// The page: one radiograph or a study of several (frontal, lateral, the prior), a viewer with window/level, and a
// conversation streamed from /v1/chat/completions.
"use strict";

const config = JSON.parse(document.getElementById("server-config").textContent);
const $ = (id) => document.getElementById(id);
// `image`: what the conversation is about, null while nothing is usable: {name (how the page names it: the file, or
// the study), images: [{name, url, view, date, uid, prior, viewGiven, bitmap, depth}], allowNonFrontal, indication,
// priorReport}. DICOM files say their view and study (`uid`); for other files the user sets the view (`viewGiven`)
// and marks the prior's.
// `loading` counts choices of files: files read after a later choice was made are dropped.
// `answerKind`: the button that began the conversation (its first answer is the report the copy button copies).
const state = { image: null, pixels: null, messages: [], answerKind: null, controller: null, report: "", loading: 0 };
const LATERAL_VIEWS = config.lateral_views;  // the server's guard's list

// ------------------------------------------------------------------ choosing the images

$("file").addEventListener("change", () => { if ($("file").files.length) load([...$("file").files]); });
const drop = $("drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  if (e.dataTransfer.files.length) load([...e.dataTransfer.files]);
});

function mediaType(file, bytes) {
  const name = file.name.toLowerCase();
  const dicm = bytes.length > 132 && String.fromCharCode(...bytes.slice(128, 132)) === "DICM";
  if (name.endsWith(".dcm") || name.endsWith(".dicom") || dicm) return "application/dicom";
  if (name.endsWith(".png") || file.type === "image/png") return "image/png";
  return "image/jpeg";
}

async function load(files) {
  // The previous images, their conversation and every button acting on them go first: whatever happens to these
  // files, nothing can be asked about images the file chooser no longer shows. One file refused refuses them all.
  const ticket = ++state.loading;
  forgetImage();
  const allowNonFrontal = $("allow-non-frontal").checked;
  const images = [];
  for (const file of files) {
    setStatus(`Reading ${file.name}...`);
    try {
      images.push(await readImage(file, allowNonFrontal, files.length > 1));
    } catch (error) {
      if (ticket === state.loading) refuse(file.name, forThePage(error.message));
      return;
    }
    if (ticket !== state.loading) return;
  }
  // The server reads a lateral view only beside a frontal one of its study; it checks again when asked.
  if (!allowNonFrontal && images.every((image) => LATERAL_VIEWS.includes(image.view))) {
    refuse(images.map((image) => image.name).join(", "), "every view is lateral (ViewPosition " +
           `${images[0].view}); choose it together with the frontal view (PA or AP) of the same study.`);
    return;
  }
  placeInStudy(images);
  $("file").value = "";  // read: the list and the subject show what is loaded, and the same files can be chosen again
  state.image = { name: images.length === 1 ? images[0].name : studyName(images), images, allowNonFrontal,
                  indication: "", priorReport: "" };
  showList(images);
  select(0);
  $("subject").textContent = images.length === 1 ? `Image: ${images[0].name}` : subject(images);
  enable({ answers: true, question: true });
  setStatus(`${state.image.name} loaded. Write a report, ask for a differential diagnosis, or ask a question.`);
}

async function readImage(file, allowNonFrontal, inStudy) {
  const bytes = new Uint8Array(await file.arrayBuffer());
  // The server decodes it as the model will (DICOM windowed by its tags) and returns an 8-bit PNG to show, with the
  // DICOM tags that place it in its study (a lateral passes in a study: `in_study`).
  const query = new URLSearchParams({ filename: file.name, allow_non_frontal: allowNonFrontal, in_study: inStudy });
  const response = await fetch(`/v1/preview?${query}`, { method: "POST", headers: headers(), body: bytes });
  if (!response.ok) throw new Error(await errorText(response));
  const tag = (name) => response.headers.get(name) || "";
  const bitmap = await createImageBitmap(await response.blob());
  // Without the values (a busy server, an image past its memory budget) the picture is still shown, unwindowed.
  const depth = await fullDepth(bytes, query).catch(() => null);
  const url = `data:${mediaType(file, bytes)};base64,${await base64(file)}`;
  return { name: file.name, url, bitmap, depth, view: tag("X-View").toUpperCase(), date: tag("X-Study-Date"),
           uid: tag("X-Study-UID"), prior: false, viewGiven: false };
}

function refuse(names, reason) {
  $("file").value = "";  // the chooser shows no file that is not loaded (and the same files can be chosen again)
  setStatus(`Cannot use ${names}, so no image is loaded: ${reason}`, true);
}

// With files of two StudyInstanceUIDs, the earlier study's are the prior's, as the server reads them.
function placeInStudy(images) {
  const dated = images.filter((image) => image.uid);
  if (!dated.length) return;
  const latest = dated.reduce((a, b) => (b.date > a.date ? b : a));
  for (const image of dated) image.prior = image.uid !== latest.uid;
}

const shownDate = (date) => (/^\d{8}$/.test(date) ? `${date.slice(0, 4)}-${date.slice(4, 6)}-${date.slice(6)}` : date);

function label(image) {
  const view = image.view ? (LATERAL_VIEWS.includes(image.view) ? "lateral" : image.view) : "view not given";
  return `${image.name}: ${view}, ${image.date ? shownDate(image.date) : "no date"}${image.prior ? ", prior study" : ""}`;
}

function studyName(images) {
  const current = images.find((image) => !image.prior);
  return `the study${current?.date ? ` of ${shownDate(current.date)}` : ""} (${images.length} images)`;
}

function subject(images) {
  const current = images.filter((image) => !image.prior), prior = images.filter((image) => image.prior);
  const names = (group) => group.map((image) => image.name).join(", ");
  const dated = (image) => (image?.date ? ` of ${shownDate(image.date)}` : "");
  const uid = current[0]?.uid ? ` ${current[0].uid}` : "";
  return `Study${uid}${dated(current[0])}: ${names(current)}` +
         (prior.length ? `; prior study${dated(prior[0])}: ${names(prior)}` : "");
}

// Each image of a study: its label (which shows it in the viewer) and, where the file does not say them (a PNG or
// JPEG has no ViewPosition or StudyInstanceUID), its view and whether it is the prior study's.
function showList(images) {
  const list = $("study-images");
  list.replaceChildren(...images.map((image, index) => {
    const item = document.createElement("li");
    const button = Object.assign(document.createElement("button"), { type: "button", textContent: label(image) });
    button.addEventListener("click", () => select(index));
    item.append(button);
    if (!image.view) {
      const view = Object.assign(document.createElement("select"), { className: "view" });
      view.setAttribute("aria-label", `View of ${image.name}`);
      for (const [value, text] of [["", "view not given"], ["PA", "PA"], ["AP", "AP"], ["LL", "lateral"]]) {
        view.append(new Option(text, value));
      }
      view.addEventListener("change", () => {
        Object.assign(image, { view: view.value, viewGiven: true });
        studyChanged(`The view of ${image.name} changed`);
      });
      item.append(view);
    }
    if (!image.uid) {
      const prior = Object.assign(document.createElement("input"), { type: "checkbox", className: "prior" });
      prior.setAttribute("aria-label", `${image.name} is an image of the prior study`);
      prior.addEventListener("change", () => {
        image.prior = prior.checked;
        studyChanged(`${image.name} is ${prior.checked ? "now" : "no longer"} marked as the prior study's`);
      });
      const text = Object.assign(document.createElement("label"), { textContent: " prior study" });
      text.prepend(prior);
      item.append(text);
    }
    return item;
  }));
  list.hidden = images.length < 2;
}

// What the user says of the study (a view, a prior mark, the indication, the prior report) goes into the
// conversation's first prompt, so a change starts the conversation anew.
for (const id of ["indication", "prior-report"]) {
  $(id).addEventListener("change",
                         () => studyChanged(`${id === "indication" ? "The indication" : "The prior report"} changed`));
}

function studyChanged(what) {
  const image = state.image;
  if (!image) return;
  image.indication = $("indication").value.trim();
  image.priorReport = $("prior-report").value.trim();
  if (image.images.length > 1) {
    image.name = studyName(image.images);
    $("subject").textContent = subject(image.images);
    $("study-images").querySelectorAll("li > button").forEach((b, i) => { b.textContent = label(image.images[i]); });
  }
  if (state.messages.length) {
    clearConversation();
    setStatus(`${what}, so the conversation starts anew about ${image.name}.`);
  }
}

function select(index) {
  const image = state.image?.images?.[index] ?? null;
  if (!image) return;
  [...$("study-images").querySelectorAll("button")].forEach((b, i) => b.setAttribute("aria-pressed", i === index));
  showImage(image.bitmap, image.name, image.depth);
}

// The server's advice names its request field; on the page, the setting is what sends it.
function forThePage(message) {
  return message.replace(/to read it anyway, send allow_non_frontal.*$/s,
                         'to read it anyway, tick "Read DICOM files whose tags say..." under Settings and choose the file again.');
}

function clearConversation() {
  state.messages = [];
  state.answerKind = null;
  state.report = "";
  $("conversation").replaceChildren();
  $("copy-button").disabled = true;
}

function forgetImage() {
  stop();
  state.image = null;
  state.pixels = null;
  clearConversation();
  $("indication").value = $("prior-report").value = "";  // they were about the images that go
  $("study-images").replaceChildren();
  $("study-images").hidden = true;
  const canvas = $("image");
  canvas.getContext("2d").clearRect(0, 0, canvas.width, canvas.height);
  canvas.setAttribute("aria-label", "No image loaded");
  $("window-controls").disabled = true;
  $("subject").textContent = "No image loaded";
  enable({ answers: false, question: false });
}

function base64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

// ------------------------------------------------------------------ the viewer: window level and width

// The canvas first shows the loader's 8-bit picture: what the model sees. The sliders window the image's own
// values (16-bit PNG or TIFF, DICOM after its modality LUT; from /v1/preview?depth=full), in the file's units, so
// no gray level the 8-bit picture merged is lost; "Reset window" returns to the model's picture.
async function fullDepth(bytes, query) {
  const response = await fetch(`/v1/preview?${query}&depth=full`, { method: "POST", headers: headers(), body: bytes });
  if (!response.ok) throw new Error(await errorText(response));
  const number = (name) => +response.headers.get(name);
  const codes = new Uint16Array(await response.arrayBuffer());
  let top = 0;
  for (const code of codes) if (code > top) top = code;
  return { codes, width: number("X-Image-Width"), height: number("X-Image-Height"), offset: number("X-Value-Offset"),
           scale: number("X-Value-Scale"), low: number("X-Window-Low"), high: number("X-Window-High"),
           invert: response.headers.get("X-Invert") === "1", top: number("X-Value-Offset") + top / number("X-Value-Scale") };
}

function showImage(bitmap, name, depth) {
  const canvas = $("image");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  state.pixels = { model: ctx.getImageData(0, 0, canvas.width, canvas.height), depth };
  canvas.setAttribute("aria-label", `Chest radiograph ${name}, ${bitmap.width} by ${bitmap.height} pixels`);
  if (!depth) return;
  // Integer values step by one; others by a thousandth of their range.
  const range = Math.max(depth.top - depth.offset, 1e-9);
  const step = depth.scale === 1 ? 1 : range / 1000;
  Object.assign($("level"), { min: depth.offset, max: depth.top, step });
  Object.assign($("width"), { min: step, max: range, step });
  $("window-controls").disabled = false;
  resetWindow();
}

function render() {
  if (!state.pixels?.depth) return;
  const level = +$("level").value, width = +$("width").value, invert = $("invert").checked;
  showWindow();
  const { codes, width: columns, height: rows, offset, scale } = state.pixels.depth;
  const lut = new Uint8ClampedArray(65536);
  const bottom = level - width / 2;
  for (let code = 0; code < 65536; code++) {
    const y = ((offset + code / scale - bottom) / width) * 255;
    lut[code] = invert !== state.pixels.depth.invert ? 255 - y : y;  // MONOCHROME1 is dark where values are high
  }
  const canvas = $("image");
  if (canvas.width !== columns || canvas.height !== rows) Object.assign(canvas, { width: columns, height: rows });
  const image = new ImageData(columns, rows);
  for (let i = 0; i < codes.length; i++) {
    image.data[4 * i] = image.data[4 * i + 1] = image.data[4 * i + 2] = lut[codes[i]];
    image.data[4 * i + 3] = 255;
  }
  canvas.getContext("2d").putImageData(image, 0, 0);
}

function showWindow() {
  const shown = (value) => String(+(+value).toPrecision(6));
  $("level-value").value = shown($("level").value);
  $("width-value").value = shown($("width").value);
}

function resetWindow() {
  if (!state.pixels?.depth) return;
  const { low, high } = state.pixels.depth;
  $("level").value = (low + high) / 2;
  $("width").value = high - low;
  $("invert").checked = false;
  showWindow();
  const canvas = $("image");
  Object.assign(canvas, { width: state.pixels.model.width, height: state.pixels.model.height });
  canvas.getContext("2d").putImageData(state.pixels.model, 0, 0);
}

for (const id of ["level", "width", "invert"]) $(id).addEventListener("input", render);
$("reset-window").addEventListener("click", resetWindow);
let drag = null;
$("image").addEventListener("pointerdown", (e) => {
  if (!state.pixels) return;
  drag = { x: e.clientX, y: e.clientY, level: +$("level").value, width: +$("width").value,
           perPixel: (+$("width").max) / $("image").clientWidth };
  $("image").setPointerCapture(e.pointerId);
});
$("image").addEventListener("pointermove", (e) => {
  if (!drag) return;
  $("width").value = drag.width + (e.clientX - drag.x) * drag.perPixel;
  $("level").value = drag.level + (e.clientY - drag.y) * drag.perPixel;
  render();
});
$("image").addEventListener("pointerup", () => { drag = null; });

// ------------------------------------------------------------------ the conversation

$("report-button").addEventListener("click", () => startAnswer(config.prompts.report, "Write a report", "report"));
$("differential-button").addEventListener("click",
  () => startAnswer(config.prompts.differential_diagnosis, "Differential diagnosis", "differential diagnosis"));
$("stop-button").addEventListener("click", stop);
$("question-form").addEventListener("submit", (e) => { e.preventDefault(); ask(); });
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); ask(); }
});
$("copy-button").addEventListener("click", copyReport);

function startAnswer(prompt, shown, kind) {
  if (!state.image || state.controller || priorMissing()) return;
  clearConversation();
  state.messages = [firstTurn(prompt)];
  state.answerKind = kind;
  addMessage("user", shown);
  answer();
}

function ask() {
  const question = $("question").value.trim();
  if (!question || !state.image || state.controller || priorMissing()) return;
  $("question").value = "";
  // A question may come first: the image then goes with it, as with a button's prompt.
  if (!state.messages.length) state.answerKind = null;
  state.messages.push(state.messages.length ? { role: "user", content: question } : firstTurn(question));
  addMessage("user", question);
  answer();
}

// The server refuses a prior report without the prior's images; the page says so in its own words, before asking.
function priorMissing() {
  if (!state.image.priorReport || state.image.images.some((image) => image.prior)) return false;
  setStatus('The prior report goes with the prior study\'s images: choose them together with this study\'s files ' +
            'and mark them "prior study" (or clear the prior report).', true);
  return true;
}

// The server's study fields: each image's view where the user gave it (DICOM files say theirs) and its prior mark.
function firstTurn(text) {
  const images = state.image.images.map((image) => ({
    type: "image_url", image_url: { url: image.url }, ...(image.viewGiven && { view: image.view }),
    ...(image.prior && { prior: true }) }));
  return { role: "user", content: [{ type: "text", text }, ...images] };
}

async function answer() {
  const image = state.image;  // what this answer is about; if another file is chosen meanwhile, it is dropped
  const current = () => state.image === image;
  const bubble = addMessage("assistant", "", image.name);
  bubble.setAttribute("aria-busy", "true");
  state.controller = new AbortController();
  enable({ answers: false, question: false });
  $("stop-button").disabled = false;
  let text = "", finish = null;
  // The first words can take long: a new server compiles its programs for each new shape of request.
  const started = Date.now();
  const waiting = () => setStatus(`Waiting for the first words about ${image.name} (${Math.round((Date.now() - started) / 1000)} s; ` +
                                  "a request of a new shape first compiles the model, which can take a minute)...");
  waiting();
  const ticker = setInterval(() => { if (current() && !text) waiting(); }, 1000);
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", signal: state.controller.signal,
      headers: { ...headers(), "Content-Type": "application/json" },
      body: JSON.stringify({ model: config.model, messages: state.messages, stream: true,
                             temperature: +$("temperature").value, max_tokens: +$("max-tokens").value,
                             allow_non_frontal: image.allowNonFrontal,
                             ...(image.indication && { indication: image.indication }),
                             ...(image.priorReport && { prior_report: image.priorReport }) }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of serverSentEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices[0];
      if (choice.delta.content) {
        if (!text) setStatus(`Writing about ${image.name}...`);
        text += choice.delta.content;
        bubble.textContent = text;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    if (!current()) return;
    state.messages.push({ role: "assistant", content: text });
    const kind = state.messages.length === 2 ? state.answerKind : null;
    if (kind) { state.report = text; $("copy-button").disabled = false; }
    setStatus(`Done: the ${kind || "answer"} about ${image.name}` +
              (finish === "length" ? " (stopped at the answer length limit)." : "."));
  } catch (error) {
    if (!current()) return;
    state.messages.pop();  // the question goes unanswered; it can be asked again
    const stopped = error.name === "AbortError";
    bubble.textContent = text + (stopped ? " [stopped]" : "");
    setStatus(stopped ? "Stopped." : `The server refused: ${error.message}`, !stopped);
  } finally {
    clearInterval(ticker);
    bubble.removeAttribute("aria-busy");
    if (current()) {
      state.controller = null;
      $("stop-button").disabled = true;
      enable({ answers: true, question: true });
    }
  }
}

async function* serverSentEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const data = buffer.slice(0, end).split("\n").filter((l) => l.startsWith("data: ")).map((l) => l.slice(6)).join("");
      buffer = buffer.slice(end + 2);
      if (data === "[DONE]") return;
      if (data) yield JSON.parse(data);
    }
  }
}

function stop() {
  if (state.controller) state.controller.abort();
  state.controller = null;
  $("stop-button").disabled = true;
}

async function copyReport() {
  try {
    await navigator.clipboard.writeText(state.report);
  } catch {
    // Without clipboard permission: select the text in a hidden field and copy that.
    const area = Object.assign(document.createElement("textarea"), { value: state.report });
    document.body.append(area);
    area.select();
    document.execCommand("copy");
    area.remove();
  }
  setStatus(`The report about ${state.image.name} is copied to the clipboard.`);
}

// ------------------------------------------------------------------ small helpers

function addMessage(role, text, about = null) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "CXR-LLaVA";
  item.append(who);
  if (about !== null) {  // every answer names the image it is about
    const name = document.createElement("span");
    name.className = "about";
    name.textContent = about;
    item.append(" about ", name);
  }
  const body = document.createElement("p");
  body.textContent = text;
  item.append(body);
  $("conversation").append(item);
  return body;
}

function enable({ answers, question }) {
  const haveImage = state.image !== null;
  $("report-button").disabled = $("differential-button").disabled = !(answers && haveImage);
  $("question").disabled = $("ask-button").disabled = !(question && haveImage);
  // The study is not changed under an answer being written about it.
  $("study-texts").disabled = !(answers && haveImage);
  $("study-images").querySelectorAll("select, input").forEach((e) => { e.disabled = !(answers && haveImage); });
}

function headers() {
  const key = $("api-key").value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

async function errorText(response) {
  try { return (await response.json()).error.message; } catch { return `HTTP ${response.status}`; }
}

function setStatus(text, isError = false) {
  const status = $("status");
  status.textContent = text;
  status.classList.toggle("error", isError);
}

$("max-tokens").max = $("max-tokens").value = config.max_output_tokens;
