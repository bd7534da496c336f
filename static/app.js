"use strict";
// The page: choose a photo, send it to the service, draw the objects it found.

const $ = (id) => document.getElementById(id);
const canvas = $("canvas");
const sliders = [$("confidence"), $("nms")];

let labels = []; // the model's labels: a label's index gives it a fixed colour
let photo = null; // the chosen photo, kept so that the sliders can re-run it
let latest = 0; // number of the latest request: answers to older ones are dropped

async function loadModel() {
  try {
    const response = await fetch("/api/model");
    const model = await response.json();
    if (!response.ok) throw new Error(model.error || response.statusText);
    labels = model.labels;
    $("confidence").value = model.confidence;
    $("nms").value = model.nms;
    showSliderValues();
    const size = model.input_size.join("×");
    $("model").textContent = `${model.model} · input ${size} · ${labels.length} labels`;
  } catch (err) {
    showError(`Cannot read the model's settings: ${err.message}`);
  }
}

async function choose(file) {
  if (!file) return;
  try {
    // A file the browser cannot decode is still sent, so that the page shows the service's own error.
    const bitmap = await createImageBitmap(file).catch(() => null);
    photo = { image: await readAsBase64(file), bitmap };
  } catch (err) {
    showError(`Cannot read ${file.name}: ${err.message}`);
    return;
  }
  detect();
}

// Plain base64 without the data URL's prefix: the service then judges the bytes,
// whatever type the browser guessed from the file's name.
function readAsBase64(file) {
  return new Promise((resolve, reject) => {
    const reader = new FileReader();
    reader.onload = () => resolve(reader.result.slice(reader.result.indexOf(",") + 1));
    reader.onerror = () => reject(reader.error);
    reader.readAsDataURL(file);
  });
}

async function detect() {
  if (!photo) return;
  const id = ++latest;
  $("latency").textContent = "…";
  const body = {
    id: `page-${id}`,
    image: photo.image,
    confidence: Number($("confidence").value),
    nms: Number($("nms").value),
  };
  const start = performance.now();
  let objects = [];
  let error = "";
  try {
    const response = await fetch("/api/object_detection", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify(body),
    });
    // A proxy in front of the service may answer an error page that is not JSON.
    const answer = await response.json().catch(() => ({}));
    if (!response.ok) throw new Error(answer.error || `${response.status} ${response.statusText}`);
    objects = answer.objects;
  } catch (err) {
    error = err.message;
  }
  if (id !== latest) return; // a slider moved meanwhile: its request's answer is the one to show
  $("latency").textContent = `${Math.round(performance.now() - start)} ms`;
  showError(error);
  render(objects, error);
}

function render(objects, error) {
  objects.sort((a, b) => b.accuracy - a.accuracy);
  canvas.hidden = !photo.bitmap;
  if (photo.bitmap) draw(photo.bitmap, objects);
  const items = objects.map((o) => {
    const item = document.createElement("li");
    const swatch = document.createElement("span");
    swatch.className = "swatch";
    swatch.setAttribute("aria-hidden", "true");
    swatch.style.background = colour(o.label);
    const label = document.createElement("span");
    label.className = "label";
    label.textContent = o.label;
    const accuracy = document.createElement("span");
    accuracy.className = "accuracy";
    accuracy.textContent = percent(o.accuracy);
    item.append(swatch, label, accuracy);
    return item;
  });
  if (!items.length && !error) {
    const none = document.createElement("li");
    none.className = "muted";
    none.textContent = "Nothing found at this confidence.";
    items.push(none);
  }
  $("objects").replaceChildren(...items);
}

function draw(bitmap, objects) {
  canvas.width = bitmap.width;
  canvas.height = bitmap.height;
  const ctx = canvas.getContext("2d");
  ctx.drawImage(bitmap, 0, 0);
  // Sizes follow the photo's size, so that boxes and text keep their proportion
  // to the photo however much the canvas is shrunk to fit the screen.
  const font = Math.max(12, Math.round(Math.max(bitmap.width, bitmap.height) / 32));
  const tag = Math.round(font * 1.3);
  ctx.lineWidth = Math.max(2, Math.round(font / 6));
  ctx.font = `${font}px sans-serif`;
  ctx.textBaseline = "middle";
  // Boxes first, then tags: no line crosses a tag. Objects come most accurate first,
  // so tags go in reverse, and where two tags overlap the more accurate one is on top.
  for (const o of objects) {
    const { left, top, width, height } = o.rectangle;
    ctx.strokeStyle = colour(o.label);
    ctx.strokeRect(left, top, width, height);
  }
  for (const o of [...objects].reverse()) {
    const { left, top } = o.rectangle;
    const text = `${o.label} ${percent(o.accuracy)}`;
    // The tag sits above the box, inside it where the box touches the top, and never off the right edge.
    const tagWidth = ctx.measureText(text).width + font * 0.6;
    const x = Math.max(0, Math.min(left, bitmap.width - tagWidth));
    const y = top >= tag ? top - tag : top;
    ctx.fillStyle = colour(o.label);
    ctx.fillRect(x, y, tagWidth, tag);
    ctx.fillStyle = "#000";
    ctx.fillText(text, x + font * 0.3, y + tag / 2);
  }
  const found = objects.map((o) => o.label).join(", ") || "nothing";
  canvas.setAttribute("aria-label", `The photo with the objects found: ${found}`);
}

// The same colours as server.py's label_colour, so that the page and ?annotate=1 agree:
// hues spread by the golden ratio in OpenCV's 2-degree steps, HSV (h, 200/255, 1) as HSL.
function colour(label) {
  const hue = Math.trunc(((labels.indexOf(label) * 0.618034) % 1) * 180) * 2;
  return `hsl(${hue}, 100%, 61%)`;
}

function percent(accuracy) {
  return `${(accuracy * 100).toFixed(1)}%`;
}

function showError(message) {
  $("error").textContent = message;
  $("error").hidden = !message;
}

function showSliderValues() {
  for (const slider of sliders) $(`${slider.id}-value`).textContent = Number(slider.value).toFixed(2);
}

for (const slider of sliders) {
  slider.addEventListener("input", showSliderValues);
  slider.addEventListener("change", detect); // on release, not on every step of a drag
}
$("file").addEventListener("change", () => choose($("file").files[0]));

// The whole window takes a dropped photo; without preventDefault the browser would open it instead.
window.addEventListener("dragover", (event) => {
  event.preventDefault();
  $("drop").classList.add("over");
});
window.addEventListener("dragleave", () => $("drop").classList.remove("over"));
window.addEventListener("drop", (event) => {
  event.preventDefault();
  $("drop").classList.remove("over");
  choose(event.dataTransfer.files[0]);
});

loadModel();
