// The page: one radiograph, a viewer with window/level, and a conversation streamed from /v1/chat/completions.
"use strict";

const config = JSON.parse(document.getElementById("server-config").textContent);
const $ = (id) => document.getElementById(id);
const state = { imageUrl: null, pixels: null, messages: [], controller: null, report: "" };

// ------------------------------------------------------------------ choosing an image

$("file").addEventListener("change", () => { if ($("file").files.length) load($("file").files[0]); });
const drop = $("drop");
for (const name of ["dragenter", "dragover"]) {
  drop.addEventListener(name, (e) => { e.preventDefault(); drop.classList.add("over"); });
}
for (const name of ["dragleave", "drop"]) {
  drop.addEventListener(name, () => drop.classList.remove("over"));
}
drop.addEventListener("drop", (e) => {
  e.preventDefault();
  if (e.dataTransfer.files.length) load(e.dataTransfer.files[0]);
});

function mediaType(file, bytes) {
  const name = file.name.toLowerCase();
  const dicm = bytes.length > 132 && String.fromCharCode(...bytes.slice(128, 132)) === "DICM";
  if (name.endsWith(".dcm") || name.endsWith(".dicom") || dicm) return "application/dicom";
  if (name.endsWith(".png") || file.type === "image/png") return "image/png";
  return "image/jpeg";
}

async function load(file) {
  stop();
  setStatus(`Reading ${file.name}...`);
  const bytes = new Uint8Array(await file.arrayBuffer());
  try {
    // The server decodes it as the model will (DICOM windowed by its tags) and returns an 8-bit PNG to show.
    const response = await fetch(`/v1/preview?filename=${encodeURIComponent(file.name)}`,
                                 { method: "POST", headers: headers(), body: bytes });
    if (!response.ok) throw new Error(await errorText(response));
    const bitmap = await createImageBitmap(await response.blob());
    showImage(bitmap, file.name);
  } catch (error) {
    setStatus(`Cannot use ${file.name}: ${error.message}`, true);
    return;
  }
  state.imageUrl = `data:${mediaType(file, bytes)};base64,${await base64(file)}`;
  state.messages = [];
  state.report = "";
  $("conversation").replaceChildren();
  enable({ tasks: true, question: false });
  $("copy-button").disabled = true;
  setStatus(`${file.name} loaded. Write a report or ask for a differential diagnosis.`);
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

function showImage(bitmap, name) {
  const canvas = $("image");
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  const rgba = ctx.getImageData(0, 0, canvas.width, canvas.height);
  const gray = new Uint8Array(canvas.width * canvas.height);
  for (let i = 0; i < gray.length; i++) gray[i] = rgba.data[4 * i];
  state.pixels = { rgba, gray };
  canvas.setAttribute("aria-label", `Chest radiograph ${name}, ${bitmap.width} by ${bitmap.height} pixels`);
  $("window-controls").disabled = false;
  resetWindow();
}

function render() {
  if (!state.pixels) return;
  const level = +$("level").value, width = +$("width").value, invert = $("invert").checked;
  $("level-value").value = level;
  $("width-value").value = width;
  const lut = new Uint8ClampedArray(256);
  for (let v = 0; v < 256; v++) {
    const y = ((v - (level - width / 2)) / width) * 255;
    lut[v] = invert ? 255 - y : y;
  }
  const { rgba, gray } = state.pixels;
  for (let i = 0; i < gray.length; i++) {
    const y = lut[gray[i]];
    rgba.data[4 * i] = rgba.data[4 * i + 1] = rgba.data[4 * i + 2] = y;
  }
  $("image").getContext("2d").putImageData(rgba, 0, 0);
}

function resetWindow() {
  $("level").value = 128;
  $("width").value = 256;
  $("invert").checked = false;
  render();
}

for (const id of ["level", "width", "invert"]) $(id).addEventListener("input", render);
$("reset-window").addEventListener("click", resetWindow);
let drag = null;
$("image").addEventListener("pointerdown", (e) => {
  if (!state.pixels) return;
  drag = { x: e.clientX, y: e.clientY, level: +$("level").value, width: +$("width").value };
  $("image").setPointerCapture(e.pointerId);
});
$("image").addEventListener("pointermove", (e) => {
  if (!drag) return;
  $("width").value = drag.width + (e.clientX - drag.x);
  $("level").value = drag.level + (e.clientY - drag.y);
  render();
});
$("image").addEventListener("pointerup", () => { drag = null; });

// ------------------------------------------------------------------ the conversation

$("report-button").addEventListener("click", () => startTask(config.prompts.report, "Write a report"));
$("differential-button").addEventListener("click",
  () => startTask(config.prompts.differential_diagnosis, "Differential diagnosis"));
$("stop-button").addEventListener("click", stop);
$("question-form").addEventListener("submit", (e) => { e.preventDefault(); ask(); });
$("question").addEventListener("keydown", (e) => {
  if (e.key === "Enter" && !e.shiftKey) { e.preventDefault(); ask(); }
});
$("copy-button").addEventListener("click", copyReport);

function startTask(prompt, shown) {
  state.messages = [{ role: "user", content: [{ type: "text", text: prompt },
                                              { type: "image_url", image_url: { url: state.imageUrl } }] }];
  state.report = "";
  $("conversation").replaceChildren();
  addMessage("user", shown);
  answer();
}

function ask() {
  const question = $("question").value.trim();
  if (!question || !state.messages.length || state.controller) return;
  $("question").value = "";
  state.messages.push({ role: "user", content: question });
  addMessage("user", question);
  answer();
}

async function answer() {
  const bubble = addMessage("assistant", "");
  bubble.setAttribute("aria-busy", "true");
  state.controller = new AbortController();
  enable({ tasks: false, question: false });
  $("stop-button").disabled = false;
  setStatus("Writing...");
  let text = "", finish = null;
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", signal: state.controller.signal,
      headers: { ...headers(), "Content-Type": "application/json" },
      body: JSON.stringify({ model: config.model, messages: state.messages, stream: true,
                             temperature: +$("temperature").value, max_tokens: +$("max-tokens").value }),
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of serverSentEvents(response)) {
      if (event.error) throw new Error(event.error.message);
      const choice = event.choices[0];
      if (choice.delta.content) { text += choice.delta.content; bubble.textContent = text; }
      if (choice.finish_reason) finish = choice.finish_reason;
    }
    state.messages.push({ role: "assistant", content: text });
    if (state.messages.length === 2) { state.report = text; $("copy-button").disabled = false; }
    setStatus(finish === "length" ? "Done (stopped at the answer length limit)." : "Done.");
  } catch (error) {
    state.messages.pop();  // the question goes unanswered; it can be asked again
    const stopped = error.name === "AbortError";
    bubble.textContent = text + (stopped ? " [stopped]" : "");
    setStatus(stopped ? "Stopped." : `The server refused: ${error.message}`, !stopped);
  } finally {
    bubble.removeAttribute("aria-busy");
    state.controller = null;
    $("stop-button").disabled = true;
    enable({ tasks: true, question: state.messages.length > 0 });
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
  setStatus("Report copied to the clipboard.");
}

// ------------------------------------------------------------------ small helpers

function addMessage(role, text) {
  const item = document.createElement("li");
  item.className = `message ${role}`;
  const who = document.createElement("span");
  who.className = "who";
  who.textContent = role === "user" ? "You" : "CXR-LLaVA";
  const body = document.createElement("p");
  body.textContent = text;
  item.append(who, body);
  $("conversation").append(item);
  return body;
}

function enable({ tasks, question }) {
  const haveImage = state.imageUrl !== null;
  $("report-button").disabled = $("differential-button").disabled = !(tasks && haveImage);
  $("question").disabled = $("ask-button").disabled = !question;
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
