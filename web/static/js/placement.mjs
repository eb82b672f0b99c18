// The stamp's place on the buyer's page: a preview of the chosen page (pdf.js, vendored under
// /static/vendor/pdfjs by shared/devtools/vendor.py) and a 100×100 pt outline the buyer drags with a
// mouse or a finger, taps into place, or nudges with the arrow keys.
//
// The API takes the stamp's lower-left corner in PDF points, in the chosen page's visible box
// (CropBox, clipped to the MediaBox), in the page's unrotated space (API.md). pdf.js shows the page
// turned by its /Rotate, as every reader does, so the outline's corners on screen are converted through
// the same viewport pdf.js drew with; the stamping kernel turns the art to read upright on the shown
// page, and its footprint is the same square, so the preview and the stamped file agree.

const STAMP_SIZE = 100; // points, the stamp's side (shared/stamping STAMP_SIZE)
const VENDOR = "/static/vendor/pdfjs/";

let pdfjs = null;

// ``urls``: the library's and its worker's addresses with their content hashes (the page passes them;
// static files are cached an hour, and pdf.js refuses a worker of another version).
async function library(urls) {
  if (!pdfjs) {
    pdfjs = await import(urls.library || VENDOR + "pdf.min.mjs");
    pdfjs.GlobalWorkerOptions.workerSrc = urls.worker || VENDOR + "pdf.worker.min.mjs";
  }
  return pdfjs;
}

/** Pure: where a stamp whose top-left screen corner is at (left, top) lands, in API coordinates. */
export function toApi(viewport, view, left, top, size) {
  const a = viewport.convertToPdfPoint(left, top);
  const b = viewport.convertToPdfPoint(left + size, top + size);
  return { x: Math.min(a[0], b[0]) - view[0], y: Math.min(a[1], b[1]) - view[1] };
}

/** Pure: the top-left screen corner of the stamp placed at API coordinates (x, y). */
export function fromApi(viewport, view, x, y) {
  const a = viewport.convertToViewportPoint(view[0] + x, view[1] + y);
  const b = viewport.convertToViewportPoint(view[0] + x + STAMP_SIZE, view[1] + y + STAMP_SIZE);
  return { left: Math.min(a[0], b[0]), top: Math.min(a[1], b[1]) };
}

function clamp(value, low, high) { return Math.min(Math.max(value, low), Math.max(low, high)); }

/**
 * A preview bound to the page's elements: ``stage`` (holds the canvas and the outline), ``canvas``,
 * ``stamp`` (the outline), the form's ``page``, ``x`` and ``y`` inputs, and ``onChange(text)`` to
 * announce the position. Returns an object with ``open(file)`` and ``show(pageNumber)``.
 */
export function createPreview({ stage, canvas, stamp, pageInput, xInput, yInput, onChange, onPages, urls = {} }) {
  let doc = null, page = null, viewport = null, view = null, scale = 1;
  let left = 0, top = 0, rendering = null, loaded = 0;

  function size() { return STAMP_SIZE * scale; }

  function place(newLeft, newTop, write) {
    left = clamp(newLeft, 0, viewport.width - size());
    top = clamp(newTop, 0, viewport.height - size());
    stamp.style.left = left + "px";
    stamp.style.top = top + "px";
    stamp.style.width = stamp.style.height = size() + "px";
    const point = toApi(viewport, view, left, top, size());
    const width = view[2] - view[0], height = view[3] - view[1];
    // Whole points (a rounding no eye sees), kept inside the visible box.
    const x = clamp(Math.round(point.x), 0, Math.floor(width - STAMP_SIZE));
    const y = clamp(Math.round(point.y), 0, Math.floor(height - STAMP_SIZE));
    if (write) { xInput.value = String(x); yInput.value = String(y); }
    onChange && onChange(x, y);
  }

  async function show(number) {
    if (!doc) { return; }
    number = clamp(Math.round(Number(number) || 1), 1, doc.numPages);
    pageInput.value = String(number);
    const ticket = ++loaded;
    page = await doc.getPage(number);
    if (ticket !== loaded) { return; }
    const unscaled = page.getViewport({ scale: 1 });
    const wrap = stage.parentElement, padding = getComputedStyle(wrap);
    const room = wrap.clientWidth - parseFloat(padding.paddingLeft) - parseFloat(padding.paddingRight);
    scale = Math.min(1.5, (room > 0 ? room : unscaled.width) / unscaled.width);
    viewport = page.getViewport({ scale });
    view = page.view;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.floor(viewport.width * ratio);
    canvas.height = Math.floor(viewport.height * ratio);
    canvas.style.width = viewport.width + "px";
    canvas.style.height = viewport.height + "px";
    stage.style.width = viewport.width + "px";
    stage.style.height = viewport.height + "px";
    if (rendering) { rendering.cancel(); }
    rendering = page.render({ canvasContext: canvas.getContext("2d"), viewport,
                              transform: ratio !== 1 ? [ratio, 0, 0, ratio, 0, 0] : null });
    try { await rendering.promise; } catch (e) { if (e && e.name === "RenderingCancelledException") { return; } throw e; }
    stage.hidden = false;
    const typed = typedPoint();
    if (typed) {
      const corner = fromApi(viewport, view, typed.x, typed.y);
      place(corner.left, corner.top, true);
    } else {  // bottom right of the page as shown, where a stamp usually goes
      place(viewport.width - size() - 36 * scale, viewport.height - size() - 48 * scale, true);
    }
    stage.dataset.ready = String(number);
  }

  function typedPoint() {
    if (xInput.dataset.touched !== "1") { return null; }
    const x = Number(xInput.value), y = Number(yInput.value);
    return Number.isFinite(x) && Number.isFinite(y) ? { x, y } : null;
  }

  async function open(file) {
    if (doc) { doc.destroy(); doc = null; }
    viewport = null;  // until this file shows, nothing to drag and no page count to hold the input to
    pageInput.removeAttribute("max");
    stage.hidden = true;
    const lib = await library(urls);
    const data = new Uint8Array(await file.arrayBuffer());
    const task = lib.getDocument({ data, isEvalSupported: false, enableXfa: false,
                                   standardFontDataUrl: VENDOR + "standard_fonts/", cMapUrl: VENDOR + "cmaps/", useWorkerFetch: false,
                                   cMapPacked: true, useWasm: false });
    doc = await task.promise;
    pageInput.max = String(doc.numPages);
    onPages && onPages(doc.numPages);
    await show(pageInput.value);
    return doc.numPages;
  }

  // Dragging: pointer events cover mouse, pen and touch; touch-action: none on the outline keeps the
  // page from scrolling under the finger.
  let drag = null;
  stamp.addEventListener("pointerdown", (event) => {
    if (!viewport) { return; }
    drag = { id: event.pointerId, x: event.clientX, y: event.clientY, left, top };
    stamp.setPointerCapture(event.pointerId);
    stamp.focus({ preventScroll: true });
    event.preventDefault();
  });
  stamp.addEventListener("pointermove", (event) => {
    if (!drag || event.pointerId !== drag.id) { return; }
    place(drag.left + event.clientX - drag.x, drag.top + event.clientY - drag.y, true);
  });
  const stop = (event) => { if (drag && event.pointerId === drag.id) { drag = null; } };
  stamp.addEventListener("pointerup", stop);
  stamp.addEventListener("pointercancel", stop);
  // A tap or click on the page puts the stamp's centre there.
  canvas.addEventListener("click", (event) => {
    if (!viewport) { return; }
    const box = canvas.getBoundingClientRect();
    place(event.clientX - box.left - size() / 2, event.clientY - box.top - size() / 2, true);
  });
  // Arrow keys move by a point (Shift: ten) in the direction they point on screen.
  stamp.addEventListener("keydown", (event) => {
    const steps = { ArrowLeft: [-1, 0], ArrowRight: [1, 0], ArrowUp: [0, -1], ArrowDown: [0, 1] }[event.key];
    if (!steps || !viewport) { return; }
    const step = (event.shiftKey ? 10 : 1) * scale;
    place(left + steps[0] * step, top + steps[1] * step, true);
    event.preventDefault();
  });
  // Typed coordinates move the outline (kept inside the page).
  for (const input of [xInput, yInput]) {
    input.addEventListener("input", () => {
      input.dataset.touched = "1"; xInput.dataset.touched = "1";
      const typed = typedPoint();
      if (!typed || !viewport) { return; }
      const corner = fromApi(viewport, view, typed.x, typed.y);
      place(corner.left, corner.top, false);
    });
  }
  pageInput.addEventListener("change", () => { show(pageInput.value); });
  let resized = null;
  window.addEventListener("resize", () => {
    clearTimeout(resized);
    resized = setTimeout(() => { if (doc) { xInput.dataset.touched = "1"; show(pageInput.value); } }, 200);
  });

  return { open, show, pages: () => (doc ? doc.numPages : 0) };
}
