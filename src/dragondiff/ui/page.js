// dragondiff's page script (app.page_head puts it in the page's head, after window.DRAGONDIFF_UPLOAD: the upload
// limits of dragondiff.limits).
//
// 1. Uploads into an image editor (.dd-upload: file picker, drop, clipboard) are checked before the editor reads
//    them: bytes first, then the format and size from the file's header (no decoding). A file over the limits or
//    not an image is refused with a message on the editor naming it and what is accepted; the editor never loads
//    it, so a huge picture cannot freeze the page and no upload is left half done.
// 2. Clicks on a points panel (.dd-points, id "<task>-points") are recorded here, not by the image's own select
//    events (which the page drops while the panel is being redrawn: quick clicks were lost). Each click appends its
//    position, in the panel picture's pixels, to the whole list of points kept in the tab's hidden field
//    ("<task>-points-data", JSON {"epoch", "seq", "points": [[x, y], ...]}); "Undo last point" and "Clear points"
//    edit that list. The field's change event sends the whole list, so an event merged with or dropped for a later
//    one loses no point: the server redraws the panel from the newest list (by seq). The server starts a new epoch
//    when the image changes.
(() => {
  const LIMITS = window.DRAGONDIFF_UPLOAD;
  if (!LIMITS || window.__dragondiffPage) return;
  window.__dragondiffPage = true;

  // ------------------------------------------------------------------------------------------ clicked points
  const field = (task) => document.querySelector(`#${task}-points-data textarea, #${task}-points-data input`);

  // {epoch, seq, points}: the server starts an epoch (a new picture, no points); each edit here counts seq up, so
  // that the server never draws an older list over a newer one (redraw requests can arrive out of order)
  function readPoints(input) {
    try {
      const data = JSON.parse(input.value || "[]");
      if (Array.isArray(data)) return {epoch: 0, seq: 0, points: data};
      if (data && Array.isArray(data.points)) return {epoch: data.epoch | 0, seq: data.seq | 0, points: data.points};
    } catch (e) { /* unreadable: an empty list */ }
    return {epoch: 0, seq: 0, points: []};
  }

  function writePoints(task, edit) {
    const input = field(task);
    if (!input) return;
    const list = readPoints(input);
    input.value = JSON.stringify({epoch: list.epoch, seq: list.seq + 1, points: edit(list.points)});
    input.dispatchEvent(new Event("input", {bubbles: true}));  // the field takes the value: its change event
  }

  // The picture's size in pixels, per panel: while a redrawn panel's new picture loads, the <img> reports
  // naturalWidth 0 (clicks in that moment were dropped: finding 15c); a redraw keeps the size, so the last size
  // seen stands in, and every picture that finishes loading updates it.
  const sizes = new Map();
  function pictureSize(img) {
    const panel = img.closest(".dd-points");
    if (img.naturalWidth && img.naturalHeight) sizes.set(panel, [img.naturalWidth, img.naturalHeight]);
    return sizes.get(panel) || [0, 0];
  }
  document.addEventListener("load", (e) => {  // load does not bubble: caught on the way down
    if (e.target instanceof HTMLImageElement && e.target.closest(".dd-points")) pictureSize(e.target);
  }, true);

  // the pixel of the panel's picture under a click, as the image's own select event computes it: the <img> fills
  // its box with object-fit scale-down (never enlarged), centred; null outside the picture
  function pixel(img, e) {
    const box = img.getBoundingClientRect();
    const [w, h] = pictureSize(img);
    if (!w || !h || !box.width || !box.height) return null;
    const r = Math.min(box.width / w, box.height / h, 1);
    const x = Math.round((e.clientX - box.left - (box.width - w * r) / 2) / r);
    const y = Math.round((e.clientY - box.top - (box.height - h * r) / 2) / r);
    return x < 0 || x >= w || y < 0 || y >= h ? null : [x, y];
  }

  function onPanel(e) {
    const img = e.target instanceof HTMLImageElement ? e.target : null;
    const panel = img && img.closest(".dd-points");
    if (!panel || !panel.id.endsWith("-points")) return;
    const xy = pixel(img, e);
    if (!xy) return;
    writePoints(panel.id.slice(0, -"-points".length), (list) => [...list, xy]);
  }

  // A mouse or pen press counts at once (a click whose image is redrawn between press and release would be lost);
  // a tap counts on its click, so that a touch that scrolls the page adds no point.
  let lastPointer = "";
  document.addEventListener("pointerdown", (e) => {
    lastPointer = e.pointerType;
    if (e.pointerType !== "touch" && e.button === 0 && e.isPrimary) onPanel(e);
  }, true);
  document.addEventListener("click", (e) => {
    if ((e.pointerType || lastPointer) === "touch") onPanel(e);
    const button = e.target.closest && e.target.closest(".dd-undo-point, .dd-clear-points");
    if (!button || !button.id) return;
    const clear = button.classList.contains("dd-clear-points");
    const task = button.id.slice(0, -(clear ? "-clear-points" : "-undo-point").length);
    writePoints(task, (list) => (clear ? [] : list.slice(0, -1)));
  }, true);

  // ------------------------------------------------------------------------------------------ upload checks
  const u16 = (b, i, little) => little ? b[i] | (b[i + 1] << 8) : (b[i] << 8) | b[i + 1];
  const u32 = (b, i, little) => little ? (u16(b, i, true) + u16(b, i + 2, true) * 65536)
                                       : (u16(b, i) * 65536 + u16(b, i + 2));
  const ascii = (b, i, n) => String.fromCharCode(...b.slice(i, i + n));

  // {format, width, height} from the header of a PNG, JPEG, WebP, GIF or BMP; {format: ""} for anything else
  function header(b) {
    if (b.length >= 24 && b[0] === 0x89 && ascii(b, 1, 3) === "PNG") {
      return {format: "PNG", width: u32(b, 16), height: u32(b, 20)};
    }
    if (b.length >= 10 && ascii(b, 0, 4) === "GIF8") {
      return {format: "GIF", width: u16(b, 6, true), height: u16(b, 8, true)};
    }
    if (b.length >= 26 && ascii(b, 0, 2) === "BM") {
      const h = u32(b, 22, true);
      return {format: "BMP", width: u32(b, 18, true), height: h > 0x7fffffff ? 0x100000000 - h : h};
    }
    if (b.length >= 30 && ascii(b, 0, 4) === "RIFF" && ascii(b, 8, 4) === "WEBP") {
      const chunk = ascii(b, 12, 4);
      if (chunk === "VP8X") {
        return {format: "WEBP", width: 1 + b[24] + (b[25] << 8) + (b[26] << 16),
                height: 1 + b[27] + (b[28] << 8) + (b[29] << 16)};
      }
      if (chunk === "VP8L") {
        const bits = u32(b, 21, true);
        return {format: "WEBP", width: 1 + (bits & 0x3fff), height: 1 + ((bits >>> 14) & 0x3fff)};
      }
      if (chunk === "VP8 ") {
        return {format: "WEBP", width: u16(b, 26, true) & 0x3fff, height: u16(b, 28, true) & 0x3fff};
      }
      return {format: "WEBP", width: 0, height: 0};
    }
    if (b.length >= 4 && b[0] === 0xff && b[1] === 0xd8) {  // JPEG: the first start-of-frame segment has the size
      let i = 2;
      while (i + 9 < b.length) {
        if (b[i] !== 0xff) { i += 1; continue; }
        const marker = b[i + 1];
        if (marker === 0xff) { i += 1; continue; }
        if (marker === 0xd8 || marker === 0x01 || (marker >= 0xd0 && marker <= 0xd7)) { i += 2; continue; }
        if (marker >= 0xc0 && marker <= 0xcf && marker !== 0xc4 && marker !== 0xc8 && marker !== 0xcc) {
          return {format: "JPEG", width: u16(b, i + 7), height: u16(b, i + 5)};
        }
        i += 2 + u16(b, i + 2);
      }
      return {format: "JPEG", width: 0, height: 0};
    }
    return {format: ""};
  }

  // why a file is refused (null: accepted); the same words as dragondiff.ui.session.upload_problem
  async function problem(file, label) {
    let what = null;
    if (file.size > LIMITS.maxBytes) {
      what = `is ${(file.size / 1e6).toFixed(1)} MB`;
    } else {
      const h = header(new Uint8Array(await file.arrayBuffer()));
      if (!LIMITS.formats.includes(h.format)) {
        what = file.type && !file.type.startsWith("image/") ? `is not an image (${file.type} file)`
                                                            : "is not an image";
      } else if (h.width * h.height > LIMITS.maxPixels) {
        what = `is ${h.width}x${h.height} (${(h.width * h.height / 1e6).toFixed(1)} megapixels)`;
      }
    }
    return what && `${label}: ${file.name || "the pasted image"} ${what}; ${LIMITS.rule}`;
  }

  function say(box, text) {
    let note = box.querySelector(":scope > .dd-upload-error");
    if (!text) { if (note) note.remove(); return; }
    if (!note) {
      note = document.createElement("div");
      note.className = "dd-upload-error";
      note.setAttribute("role", "alert");
      box.appendChild(note);
    }
    note.textContent = text;
  }

  async function accepted(box, files) {
    const label = box.id.endsWith("-reference") ? "reference" : "image";
    for (const file of files) {
      const text = await problem(file, label);
      if (text) { say(box, text); return false; }
    }
    say(box, null);
    return true;
  }

  const approved = new WeakSet();  // events this script re-dispatched after the check
  const holdFiles = (e) => {
    const input = e.target;
    if (approved.has(e) || !(input instanceof HTMLInputElement) || input.type !== "file") return;
    const box = input.closest(".dd-upload");
    if (!box || !input.files || !input.files.length) return;
    e.stopImmediatePropagation();
    if (e.type !== "change") return;  // the check runs once, on change; both events go on if it passes
    accepted(box, [...input.files]).then((ok) => {
      if (!ok) { input.value = ""; return; }
      for (const type of ["input", "change"]) {
        const again = new Event(type, {bubbles: true});
        approved.add(again);
        input.dispatchEvent(again);
      }
    });
  };
  document.addEventListener("input", holdFiles, true);
  document.addEventListener("change", holdFiles, true);

  document.addEventListener("drop", (e) => {
    const box = e.target.closest && e.target.closest(".dd-upload");
    const files = [...((e.dataTransfer && e.dataTransfer.files) || [])];
    if (approved.has(e) || !box || !files.length) return;
    e.preventDefault();
    e.stopImmediatePropagation();
    const target = e.target;
    const data = new DataTransfer();
    files.forEach((f) => data.items.add(f));
    accepted(box, files).then((ok) => {
      if (!ok) return;
      const again = new DragEvent("drop", {bubbles: true, cancelable: true, dataTransfer: data,
                                           clientX: e.clientX, clientY: e.clientY});
      approved.add(again);
      target.dispatchEvent(again);
    });
  }, true);

  // the editors' clipboard button reads navigator.clipboard: check the image it gets
  let lastBox = null;
  document.addEventListener("pointerdown", (e) => {
    const box = e.target.closest && e.target.closest(".dd-upload");
    if (box) lastBox = box;
  }, true);
  if (navigator.clipboard && navigator.clipboard.read) {
    const read = navigator.clipboard.read.bind(navigator.clipboard);
    navigator.clipboard.read = async () => {
      const box = lastBox;
      const items = await read();
      return items.map((item) => ({
        types: item.types,
        presentationStyle: item.presentationStyle,
        getType: async (type) => {
          const blob = await item.getType(type);
          if (box && type.startsWith("image/") && !(await accepted(box, [new File([blob], "", {type})]))) {
            throw new Error("dragondiff: pasted image refused");
          }
          return blob;
        },
      }));
    };
  }
})();
