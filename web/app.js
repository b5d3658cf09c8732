// The Streamscribe page: upload a file, follow its transcript as Server-Sent Events,
// and play the file alongside with the transcript as captions and a clickable list.
//
// The upload goes through XMLHttpRequest, because it reports bytes sent and also
// exposes the response text while it grows, so one request gives both progress bars.
// When that stream ends before `done`, the page resumes with fetch() on
// /v1/jobs/{id}/events, sending the last event id it processed.

// Delay before the first reconnection, until the server sends its own `retry:` value.
// Later attempts double it, up to RESUME_MAX_DELAY_MS.
const DEFAULT_RETRY_MS = 2000;
const RESUME_MAX_DELAY_MS = 30000;
const RESUME_MAX_ATTEMPTS = 8;
// Autoscroll of the transcript stays off this long after the reader scrolls it.
const MANUAL_SCROLL_PAUSE_MS = 4000;
const ANNOUNCER_MAX_ITEMS = 5;
const API_KEY_STORAGE = "streamscribe.apiKey";
const COPY_CONFIRMATION_MS = 2000;
// Lines end with their last word, so short pauses fall between lines. The line just
// spoken stays highlighted through a pause this long, until the next line starts.
const LINE_HOLD_SECONDS = 3;

const ACTIVE_PHASES = new Set(["uploading", "checking", "transcribing", "reconnecting", "disconnected", "cancelling"]);

// Headings for the error codes that the service returns before a stream starts. The
// server's own message, which names the file and the fix, goes under the heading.
const REJECTION_TITLES = {
  no_audio_stream: "This file has no sound to transcribe",
  not_media: "This is not a video or audio file",
  empty_file: "This file is empty",
  incomplete_file: "This file is incomplete",
  upload_too_large: "This file is too large",
  duration_too_long: "This recording is too long",
  probe_timeout: "This file could not be read",
  invalid_audio_track: "That audio track does not exist",
  invalid_field: "An option is not valid",
  invalid_api_key: "This server needs an API key",
  server_busy: "The server is busy",
  insufficient_storage: "The server is out of space",
};

const ui = {
  main: byId("main"),
  intake: byId("intake"),
  workspace: byId("workspace"),
  fileInput: byId("file-input"),
  anotherFile: byId("another-file"),
  retryUpload: byId("retry-upload"),
  intakeError: byId("intake-error"),
  intakeErrorTitle: byId("intake-error-title"),
  intakeErrorDetail: byId("intake-error-detail"),
  options: byId("options"),
  languageInput: byId("language-input"),
  apiKeyInput: byId("api-key-input"),
  trackInput: byId("track-input"),
  fileName: byId("file-name"),
  fileMeta: byId("file-meta"),
  player: byId("player"),
  videoNote: byId("video-note"),
  status: byId("status"),
  uploadProgress: byId("upload-progress"),
  uploadDetail: byId("upload-detail"),
  transcriptionProgress: byId("transcription-progress"),
  transcriptionDetail: byId("transcription-detail"),
  jobError: byId("job-error"),
  jobErrorTitle: byId("job-error-title"),
  jobErrorDetail: byId("job-error-detail"),
  notices: byId("notices"),
  cancelButton: byId("cancel-button"),
  resumeButton: byId("resume-button"),
  copyButton: byId("copy-button"),
  downloads: byId("downloads"),
  transcript: byId("transcript"),
  transcriptScroll: byId("transcript-scroll"),
  transcriptEmpty: byId("transcript-empty"),
  announceToggle: byId("announce-toggle"),
  announcer: byId("announcer"),
  dropOverlay: byId("drop-overlay"),
};

/** The run shown on the page; callbacks from an earlier run check against it and stop. */
let current = null;
let lastManualScroll = 0;

function byId(id) {
  const element = document.getElementById(id);
  if (!element) throw new Error(`index.html has no element with id "${id}"`);
  return element;
}

function apiUrl(path) {
  // Relative to the page, so the service also works behind a proxy under a path prefix.
  return new URL(path, document.baseURI).href;
}

/** Return the Authorization header for the API key entered under Options, if any. */
function authHeaders() {
  const key = ui.apiKeyInput.value.trim();
  return key ? { Authorization: `Bearer ${key}` } : {};
}

// ---------------------------------------------------------------------------
// Server-Sent Events parsing (the text/event-stream format of the HTML standard)

class EventStreamParser {
  /** Calls `onEvent({id, event, data})` for each complete event in the pushed text. */
  constructor(onEvent) {
    this.onEvent = onEvent;
    this.buffer = "";
    this.started = false;
    this.lastEventId = null;
    this.retry = null;
    this.resetEvent();
  }

  resetEvent() {
    this.eventName = "";
    this.dataLines = [];
  }

  push(text) {
    if (!this.started) {
      this.started = true;
      if (text.startsWith("\uFEFF")) text = text.slice(1);
    }
    this.buffer += text;
    const lineBreak = /\r\n|\n|\r/g;
    let lineStart = 0;
    let match;
    while ((match = lineBreak.exec(this.buffer)) !== null) {
      // A lone "\r" at the very end may be the first half of a "\r\n" still on its way.
      if (match[0] === "\r" && match.index === this.buffer.length - 1) break;
      this.readLine(this.buffer.slice(lineStart, match.index));
      lineStart = lineBreak.lastIndex;
    }
    this.buffer = this.buffer.slice(lineStart);
  }

  /** Drop an event cut off by the end of the stream, as the standard requires. */
  end() {
    this.buffer = "";
    this.resetEvent();
  }

  readLine(line) {
    if (line === "") {
      if (this.dataLines.length > 0) {
        this.onEvent({
          id: this.lastEventId,
          event: this.eventName || "message",
          data: this.dataLines.join("\n"),
        });
      }
      this.resetEvent();
      return;
    }
    if (line.startsWith(":")) return;

    const colon = line.indexOf(":");
    const field = colon === -1 ? line : line.slice(0, colon);
    let value = colon === -1 ? "" : line.slice(colon + 1);
    if (value.startsWith(" ")) value = value.slice(1);

    if (field === "event") {
      this.eventName = value;
    } else if (field === "data") {
      this.dataLines.push(value);
    } else if (field === "id" && !value.includes("\0")) {
      this.lastEventId = value;
    } else if (field === "retry" && /^\d+$/.test(value)) {
      this.retry = Number(value);
    }
  }
}

// ---------------------------------------------------------------------------
// Formatting

const byteUnits = ["byte", "kilobyte", "megabyte", "gigabyte"];

function formatBytes(bytes) {
  let value = bytes;
  let unit = 0;
  while (value >= 1000 && unit < byteUnits.length - 1) {
    value /= 1000;
    unit += 1;
  }
  return new Intl.NumberFormat(undefined, {
    style: "unit",
    unit: byteUnits[unit],
    unitDisplay: "short",
    maximumFractionDigits: unit >= 2 ? 1 : 0,
  }).format(value);
}

function formatPercent(percent) {
  // Floor, so 99.9 % of a job that has not sent `done` never shows as 100 %.
  return new Intl.NumberFormat(undefined, { style: "percent", maximumFractionDigits: 0 })
    .format(Math.floor(percent) / 100);
}

function formatClock(seconds) {
  const total = Math.max(0, Math.floor(seconds || 0));
  const hours = Math.floor(total / 3600);
  const minutes = Math.floor((total % 3600) / 60);
  const secs = String(total % 60).padStart(2, "0");
  return hours > 0 ? `${hours}:${String(minutes).padStart(2, "0")}:${secs}` : `${minutes}:${secs}`;
}

function formatSeconds(seconds) {
  return new Intl.NumberFormat(undefined, { style: "unit", unit: "second", maximumFractionDigits: 1 })
    .format(seconds);
}

function plural(count, one, many) {
  return `${count} ${count === 1 ? one : many}`;
}

// ---------------------------------------------------------------------------
// Views and phases

function showView(name) {
  ui.intake.hidden = name !== "intake";
  ui.workspace.hidden = name !== "workspace";
  updateHeader();
}

function updateHeader() {
  // The intake view has its own file picker, so the header offers one only next to a
  // finished run.
  const offer = current !== null && !isActive(current) && current.phase !== "idle" && ui.intake.hidden;
  ui.anotherFile.hidden = !offer;
}

function isActive(run) {
  return run !== null && ACTIVE_PHASES.has(run.phase);
}

function setPhase(run, phase, statusText) {
  if (run !== current) return;
  run.phase = phase;
  ui.main.dataset.phase = phase;
  const active = ACTIVE_PHASES.has(phase);
  ui.cancelButton.hidden = !active || phase === "cancelling";
  ui.resumeButton.hidden = phase !== "disconnected" && phase !== "reconnecting";
  updateHeader();
  if (statusText !== undefined) ui.status.textContent = statusText;
}

function showIntakeError(title, detail, { canRetry = false } = {}) {
  ui.intakeErrorTitle.textContent = title;
  ui.intakeErrorDetail.textContent = detail;
  ui.intakeError.hidden = false;
  ui.retryUpload.hidden = !canRetry;
  showView("intake");
  ui.intakeError.focus();
}

function clearIntakeError() {
  ui.intakeError.hidden = true;
  ui.retryUpload.hidden = true;
}

function showJobError(title, detail) {
  ui.jobErrorTitle.textContent = title;
  ui.jobErrorDetail.textContent = detail;
  ui.jobErrorDetail.hidden = !detail;
  ui.jobError.hidden = false;
}

function addNotice(text) {
  const item = document.createElement("li");
  item.textContent = text;
  ui.notices.append(item);
  ui.notices.hidden = false;
}

function announce(text) {
  const item = document.createElement("p");
  item.textContent = text;
  ui.announcer.append(item);
  while (ui.announcer.childElementCount > ANNOUNCER_MAX_ITEMS) {
    ui.announcer.firstElementChild.remove();
  }
}

// ---------------------------------------------------------------------------
// Starting a run

function readOptions() {
  const language = ui.languageInput.value.trim();
  const track = ui.trackInput.value.trim();
  return { language, audioTrack: track === "" ? null : track };
}

function startRun(file, options = readOptions()) {
  if (current) {
    clearTimeout(current.resumeTimer);
    current.transport?.abort();
    if (current.videoUrl) URL.revokeObjectURL(current.videoUrl);
  }
  const run = {
    file,
    options,
    id: null,
    phase: "idle",
    lastEventId: -1,
    retryMs: DEFAULT_RETRY_MS,
    resumeAttempts: 0,
    resumeTimer: null,
    transport: null,
    info: null,
    done: null,
    lastError: null,
    segments: new Map(),
    lines: [],
    activeLine: null,
    track: null,
    video: null,
    videoUrl: null,
  };
  current = run;
  resetWorkspace(run);
  showView("workspace");
  ui.fileName.focus();
  upload(run);
}

function resetWorkspace(run) {
  clearIntakeError();
  ui.fileName.textContent = run.file.name;
  ui.fileMeta.textContent = formatBytes(run.file.size);
  ui.jobError.hidden = true;
  ui.notices.replaceChildren();
  ui.notices.hidden = true;
  ui.downloads.hidden = true;
  ui.copyButton.disabled = true;
  ui.transcript.replaceChildren();
  ui.transcriptEmpty.hidden = false;
  ui.announcer.replaceChildren();
  ui.uploadProgress.value = 0;
  ui.uploadDetail.textContent = "";
  ui.transcriptionProgress.value = 0;
  ui.transcriptionDetail.textContent = "Starts after the upload";
  ui.videoNote.hidden = true;
  createVideo(run);
}

function createVideo(run) {
  // A fresh element per run, because text tracks added by script cannot be removed.
  const video = document.createElement("video");
  video.id = "video";
  video.controls = true;
  video.playsInline = true;
  video.preload = "metadata";
  video.setAttribute("aria-label", `Playback of ${run.file.name}`);
  run.videoUrl = URL.createObjectURL(run.file);
  video.src = run.videoUrl;
  run.video = video;
  ui.player.classList.remove("audio-only");
  ui.player.replaceChildren(video);

  video.addEventListener("timeupdate", () => updateActiveLine(run));
  video.addEventListener("seeked", () => updateActiveLine(run));
  video.addEventListener("loadedmetadata", () => {
    if (video.videoWidth === 0) ui.player.classList.add("audio-only");
  });
  video.addEventListener("error", () => {
    if (run !== current) return;
    ui.player.classList.add("audio-only");
    ui.videoNote.textContent =
      "This browser cannot play this file's format, so only the transcript is shown. " +
      "The downloads still work.";
    ui.videoNote.hidden = false;
  });
}

// ---------------------------------------------------------------------------
// Upload and the first event stream

function upload(run) {
  const form = new FormData();
  form.append("file", run.file, run.file.name);
  if (run.options.language) form.append("language", run.options.language);
  if (run.options.audioTrack !== null) form.append("audio_track", run.options.audioTrack);

  const xhr = new XMLHttpRequest();
  const parser = new EventStreamParser((event) => handleEvent(run, event, parser));
  let consumed = 0;
  const isStream = () =>
    xhr.status === 200 && (xhr.getResponseHeader("Content-Type") || "").startsWith("text/event-stream");
  const readNewText = () => {
    if (!isStream()) return;
    const text = xhr.responseText;
    if (text.length > consumed) {
      parser.push(text.slice(consumed));
      consumed = text.length;
    }
  };

  xhr.upload.addEventListener("progress", (progress) => {
    showUploadProgress(run, progress.loaded, progress.lengthComputable ? progress.total : run.file.size);
  });
  xhr.upload.addEventListener("load", () => {
    showUploadProgress(run, run.file.size, run.file.size);
    if (run.phase === "uploading") setPhase(run, "checking", "Upload finished. Checking the file…");
    ui.transcriptionProgress.removeAttribute("value");
  });
  xhr.addEventListener("progress", readNewText);
  xhr.addEventListener("load", () => {
    if (run !== current) return;
    if (isStream()) {
      readNewText();
      parser.end();
      streamEnded(run);
    } else {
      rejectUpload(run, xhr);
    }
  });
  xhr.addEventListener("error", () => connectionLost(run));

  xhr.open("POST", apiUrl("v1/transcriptions"));
  xhr.setRequestHeader("Accept", "text/event-stream");
  for (const [name, value] of Object.entries(authHeaders())) xhr.setRequestHeader(name, value);
  run.transport = { abort: () => xhr.abort() };
  setPhase(run, "uploading", `Uploading ${run.file.name}…`);
  showUploadProgress(run, 0, run.file.size);
  xhr.send(form);
}

function showUploadProgress(run, loaded, total) {
  if (run !== current) return;
  const percent = total > 0 ? (100 * loaded) / total : 100;
  ui.uploadProgress.value = percent;
  ui.uploadDetail.textContent = `${formatBytes(loaded)} of ${formatBytes(total)} · ${formatPercent(percent)}`;
}

/** Show why the server rejected the upload, from its JSON error body when there is one. */
function rejectUpload(run, xhr) {
  run.transport = null;
  setPhase(run, "rejected", "");
  const { code, message } = parseErrorBody(xhr.responseText);
  const name = run.file.name;
  let title = REJECTION_TITLES[code] || `${name} was not accepted`;
  let detail = message;
  if (!detail) {
    if (xhr.status === 413) {
      title = REJECTION_TITLES.upload_too_large;
      detail = `${name} is larger than this server accepts. Send a smaller file.`;
    } else {
      detail = `The server answered HTTP ${xhr.status} ${xhr.statusText}`.trim() + ". Try again later.";
    }
  }
  const canRetry = xhr.status === 401 || xhr.status >= 500;
  if (code === "invalid_api_key") {
    detail = ui.apiKeyInput.value.trim()
      ? "The server rejected the API key entered under Options. Check it and try again."
      : "Enter the server's API key under Options, then try again.";
    ui.options.open = true;
  }
  if (code === "server_busy") {
    const wait = xhr.getResponseHeader("Retry-After");
    if (wait && /^\d+$/.test(wait)) detail += ` The server suggests waiting ${formatSeconds(Number(wait))}.`;
  }
  showIntakeError(title, detail, { canRetry });
}

function parseErrorBody(text) {
  try {
    const body = JSON.parse(text);
    const error = body && typeof body === "object" ? body.error : null;
    if (error && typeof error.message === "string") {
      return { code: error.code || null, message: sentence(error.message) };
    }
  } catch (parseError) {
    // The body is not JSON (a proxy's HTML page or nothing), so the caller writes the message.
  }
  return { code: null, message: "" };
}

function sentence(text) {
  const trimmed = text.trim();
  if (!trimmed) return trimmed;
  const capitalized = trimmed[0].toUpperCase() + trimmed.slice(1);
  return /[.!?]$/.test(capitalized) ? capitalized : `${capitalized}.`;
}

function connectionLost(run) {
  if (run !== current || run.done || run.phase === "cancelling" || run.phase === "cancelled") return;
  run.transport = null;
  if (run.id) {
    scheduleResume(run);
    return;
  }
  setPhase(run, "rejected", "");
  showIntakeError(
    "The transcription did not start",
    `The connection to the server was lost before ${run.file.name} was accepted. ` +
      "Check that the server is running and try again.",
    { canRetry: true },
  );
}

function streamEnded(run) {
  if (run !== current || run.done || run.phase === "cancelling" || run.phase === "cancelled") return;
  run.transport = null;
  if (run.id) {
    scheduleResume(run);
  } else {
    connectionLost(run);
  }
}

// ---------------------------------------------------------------------------
// Resuming after a dropped stream

function scheduleResume(run) {
  clearTimeout(run.resumeTimer);
  run.resumeAttempts += 1;
  if (run.resumeAttempts > RESUME_MAX_ATTEMPTS) {
    setPhase(run, "disconnected", "Disconnected from the server.");
    showJobError(
      "The connection to the server was lost",
      `Reconnecting failed ${RESUME_MAX_ATTEMPTS} times. The lines received so far are kept. ` +
        "Select Reconnect now to try again.",
    );
    return;
  }
  const delay = Math.min(run.retryMs * 2 ** (run.resumeAttempts - 1), RESUME_MAX_DELAY_MS);
  setPhase(run, "reconnecting", `Connection lost. Reconnecting in ${formatSeconds(delay / 1000)}…`);
  run.resumeTimer = setTimeout(() => resume(run), delay);
}

async function resume(run) {
  clearTimeout(run.resumeTimer);
  if (run !== current || run.done || !run.id) return;
  setPhase(run, "reconnecting", "Reconnecting…");

  const controller = new AbortController();
  run.transport = { abort: () => controller.abort() };
  const headers = { Accept: "text/event-stream", ...authHeaders() };
  if (run.lastEventId >= 0) headers["Last-Event-ID"] = String(run.lastEventId);

  let response;
  try {
    response = await fetch(apiUrl(`v1/jobs/${encodeURIComponent(run.id)}/events`), {
      headers,
      cache: "no-store",
      signal: controller.signal,
    });
  } catch (error) {
    if (!controller.signal.aborted) streamEnded(run);
    return;
  }
  if (run !== current) return;

  if (response.status === 404) {
    const { message } = parseErrorBody(await response.text());
    run.transport = null;
    setPhase(run, "failed", "This job is no longer on the server.");
    showJobError(
      "This job is no longer on the server",
      `${message || "The server has no job with this id."} The lines received so far are kept; ` +
        "transcribe the file again for the rest.",
    );
    return;
  }
  if (!response.ok || !response.body) {
    streamEnded(run);
    return;
  }

  ui.jobError.hidden = true;
  setPhase(run, "transcribing", "Transcribing…");
  const parser = new EventStreamParser((event) => handleEvent(run, event, parser));
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  try {
    for (;;) {
      const { value, done } = await reader.read();
      if (done) break;
      parser.push(value);
    }
    parser.end();
  } catch (error) {
    if (controller.signal.aborted) return;
  }
  streamEnded(run);
}

// ---------------------------------------------------------------------------
// Events

function handleEvent(run, event, parser) {
  if (run !== current) return;
  if (parser.retry !== null) run.retryMs = parser.retry;

  // Every event the service sends has a numeric id that counts up from 0, so an id at
  // or below the last one processed belongs to a replay and is skipped.
  const id = event.id === null ? NaN : Number(event.id);
  if (Number.isInteger(id)) {
    if (id <= run.lastEventId) return;
    run.lastEventId = id;
  }

  let data;
  try {
    data = JSON.parse(event.data);
  } catch (error) {
    console.warn(`Skipped event ${event.id} (${event.event}): its data is not JSON`, error);
    return;
  }
  run.resumeAttempts = 0;

  // Other scripts, such as the browser tests, can follow the stream through this event.
  document.dispatchEvent(new CustomEvent("streamscribe:event", {
    detail: { id, event: event.event, data },
  }));

  switch (event.event) {
    case "job":
      onJob(run, data);
      break;
    case "segment":
      onSegment(run, data);
      break;
    case "progress":
      onProgress(run, data);
      break;
    case "error":
      onError(run, data);
      break;
    case "done":
      onDone(run, data);
      break;
    default:
      break;
  }
}

function onJob(run, job) {
  run.id = job.job_id;
  run.info = job;
  setPhase(run, "transcribing", "Transcribing…");

  const meta = [];
  if (job.duration) meta.push(formatClock(job.duration));
  meta.push(formatBytes(run.file.size));
  if (job.audio_codec) meta.push(`${job.audio_codec.toUpperCase()} audio`);
  if (job.audio_tracks > 1) meta.push(`track ${job.audio_track + 1} of ${job.audio_tracks}`);
  if (job.model) meta.push(`model ${job.model}`);
  ui.fileMeta.textContent = meta.join(" · ");

  for (const link of ui.downloads.querySelectorAll("a[data-format]")) {
    link.href = apiUrl(`v1/jobs/${encodeURIComponent(job.job_id)}/transcript.${link.dataset.format}`);
  }
  ui.transcriptionProgress.value = 0;
  ui.transcriptionDetail.textContent = job.planned_segments
    ? `0 of about ${plural(job.planned_segments, "segment", "segments")}`
    : "Starting";
}

function onSegment(run, segment) {
  if (run.segments.has(segment.index)) return;
  run.segments.set(segment.index, segment);

  let cues = Array.isArray(segment.cues) ? segment.cues : [];
  if (cues.length === 0 && segment.text) {
    cues = [{ start: segment.start, end: segment.end, text: segment.text }];
  }
  const added = [];
  for (const cue of cues) {
    const text = (cue.text || "").trim();
    if (!text) continue;
    addLine(run, { start: cue.start, end: cue.end, text, segment: segment.index }, segment.language);
    added.push(text);
  }

  if (added.length > 0) {
    ui.transcriptEmpty.hidden = true;
    ui.copyButton.disabled = false;
    if (ui.announceToggle.checked) announce(`From ${formatClock(segment.start)}: ${added.join(" ")}`);
    updateActiveLine(run);
  }
}

function onProgress(run, progress) {
  const total = progress.segments_total ?? run.info?.planned_segments ?? null;
  const segments = total === null
    ? plural(progress.segments_done, "segment", "segments")
    : `${progress.segments_done} of ${progress.segments_total === null ? "about " : ""}${plural(total, "segment", "segments")}`;
  const parts = [segments];
  if (progress.duration) {
    parts.push(`${formatClock(progress.seconds_done)} of ${formatClock(progress.duration)}`);
  }
  parts.push(formatPercent(progress.percent));
  ui.transcriptionProgress.value = progress.percent;
  ui.transcriptionDetail.textContent = parts.join(" · ");
}

function onError(run, error) {
  run.lastError = error;
  const message = sentence(error.message || "An unknown error occurred.");
  addNotice(error.segment === null || error.segment === undefined
    ? message
    : `Segment ${error.segment + 1}: ${message}`);
}

function onDone(run, done) {
  run.done = done;
  clearTimeout(run.resumeTimer);
  run.transport = null;
  ui.jobError.hidden = true;
  const lines = plural(run.lines.length, "line", "lines");

  if (done.status === "completed") {
    ui.transcriptionProgress.value = 100;
    const parts = [plural(done.segments, "segment", "segments")];
    if (done.duration) parts.push(`${formatClock(done.duration)} of audio`);
    parts.push(formatPercent(100));
    ui.transcriptionDetail.textContent = parts.join(" · ");
    setPhase(run, "completed", `Done: ${lines} in ${formatSeconds(done.elapsed_seconds)}.`);
    announce(`Transcription finished: ${lines}.`);
  } else if (done.status === "cancelled") {
    setPhase(run, "cancelled", `Cancelled. The ${lines} transcribed before that are kept.`);
  } else {
    if (!ui.transcriptionProgress.hasAttribute("value")) ui.transcriptionProgress.value = 0;
    setPhase(run, "failed", "Transcription failed.");
    showJobError(
      "The transcription failed",
      run.lastError ? sentence(run.lastError.message) : "The server did not say why.",
    );
  }
  for (const note of done.notes || []) addNotice(sentence(note));
  ui.downloads.hidden = run.segments.size === 0;
  ui.copyButton.disabled = run.lines.length === 0;
}

// ---------------------------------------------------------------------------
// Transcript lines, captions and the highlighted line

function addLine(run, line, language) {
  line.element = createLineElement(line);

  // Segments arrive in completion order, so each line goes to its place on the timeline.
  let low = 0;
  let high = run.lines.length;
  while (low < high) {
    const middle = (low + high) >> 1;
    if (run.lines[middle].start <= line.start) low = middle + 1;
    else high = middle;
  }
  const next = run.lines[low];
  run.lines.splice(low, 0, line);
  ui.transcript.insertBefore(line.element.parentElement, next ? next.element.parentElement : null);
  if (!ui.transcript.querySelector('.line[tabindex="0"]')) line.element.tabIndex = 0;

  addCaption(run, line, language);
}

function createLineElement(line) {
  const item = document.createElement("li");
  const button = document.createElement("button");
  button.type = "button";
  button.className = "line";
  button.tabIndex = -1;
  button.dataset.start = String(line.start);
  button.dataset.end = String(line.end);

  const stamp = document.createElement("span");
  stamp.className = "stamp";
  stamp.textContent = formatClock(line.start);
  const text = document.createElement("span");
  text.className = "line-text";
  text.textContent = line.text;

  button.append(stamp, text);
  item.append(button);
  return button;
}

function addCaption(run, line, language) {
  if (typeof VTTCue === "undefined") return;
  if (!run.track) {
    run.track = run.video.addTextTrack("captions", "Transcript", language || run.options.language || "");
    run.track.mode = "showing";
  }
  const end = Math.max(line.end, line.start + 0.5);
  run.track.addCue(new VTTCue(line.start, end, line.text));
}

function findLineAt(run, time) {
  let low = 0;
  let high = run.lines.length;
  while (low < high) {
    const middle = (low + high) >> 1;
    if (run.lines[middle].start <= time) low = middle + 1;
    else high = middle;
  }
  const candidate = run.lines[low - 1];
  return candidate && time < candidate.end + LINE_HOLD_SECONDS ? candidate : null;
}

function updateActiveLine(run) {
  if (run !== current || !run.video) return;
  const line = findLineAt(run, run.video.currentTime);
  if (line === run.activeLine) return;
  run.activeLine?.element.removeAttribute("aria-current");
  run.activeLine = line;
  if (!line) return;
  line.element.setAttribute("aria-current", "true");
  if (!run.video.paused) scrollLineIntoView(line.element);
}

function scrollLineIntoView(element) {
  const container = ui.transcriptScroll;
  const scrollable = container.scrollHeight > container.clientHeight + 1 &&
    getComputedStyle(container).overflowY !== "visible";
  if (!scrollable || Date.now() - lastManualScroll < MANUAL_SCROLL_PAUSE_MS) return;

  const top = element.offsetTop;
  const bottom = top + element.offsetHeight;
  const viewTop = container.scrollTop;
  if (top >= viewTop && bottom <= viewTop + container.clientHeight * 0.75) return;
  const reduceMotion = matchMedia("(prefers-reduced-motion: reduce)").matches;
  container.scrollTo({ top: Math.max(0, top - container.clientHeight / 4), behavior: reduceMotion ? "auto" : "smooth" });
}

function seekToLine(run, element) {
  if (!run?.video) return;
  run.video.currentTime = Number(element.dataset.start);
  updateActiveLine(run);
  run.video.play().catch(() => {
    // Playback may be blocked or the format unsupported, but the seek still happened.
  });
}

function moveLineFocus(from, key) {
  const lines = [...ui.transcript.querySelectorAll(".line")];
  const index = lines.indexOf(from);
  if (index === -1) return false;
  let target = index;
  if (key === "ArrowDown") target = Math.min(lines.length - 1, index + 1);
  else if (key === "ArrowUp") target = Math.max(0, index - 1);
  else if (key === "Home") target = 0;
  else if (key === "End") target = lines.length - 1;
  else return false;
  lines[target].focus();
  return true;
}

// ---------------------------------------------------------------------------
// Actions

async function cancelRun(run) {
  if (!isActive(run)) return;
  clearTimeout(run.resumeTimer);
  run.transport?.abort();
  run.transport = null;

  if (!run.id) {
    setPhase(run, "cancelled", "");
    showIntakeError("Upload cancelled", `${run.file.name} was not transcribed. Choose a file to start again.`);
    return;
  }

  setPhase(run, "cancelling", "Cancelling…");
  try {
    const response = await fetch(apiUrl(`v1/jobs/${encodeURIComponent(run.id)}/cancel`), {
      method: "POST",
      headers: authHeaders(),
    });
    if (!response.ok) {
      const { message } = parseErrorBody(await response.text());
      addNotice(message || `The server answered HTTP ${response.status} to the cancel request.`);
    }
  } catch (error) {
    addNotice("The cancel request did not reach the server. The server stops a job by itself " +
      "shortly after its last reader leaves.");
  }
  if (run !== current) return;
  const lines = plural(run.lines.length, "line", "lines");
  setPhase(run, "cancelled", `Cancelled. The ${lines} transcribed before that are kept.`);
  ui.downloads.hidden = run.segments.size === 0;
}

function transcriptText(run) {
  if (run.done && run.done.text) return run.done.text;
  return run.lines.map((line) => line.text).join(" ");
}

async function copyTranscript(run) {
  if (!run) return;
  const text = transcriptText(run);
  let copied = false;
  try {
    await navigator.clipboard.writeText(text);
    copied = true;
  } catch (error) {
    copied = copyWithSelection(text);
  }
  const label = copied ? "Copied" : "Copy failed";
  ui.copyButton.textContent = label;
  announce(copied ? "Transcript copied to the clipboard." : "The browser did not allow copying the transcript.");
  setTimeout(() => {
    ui.copyButton.textContent = "Copy text";
  }, COPY_CONFIRMATION_MS);
}

function copyWithSelection(text) {
  // navigator.clipboard exists only on secure origins (https or localhost), so a page
  // served over plain http on a LAN address falls back to the older selection copy.
  const area = document.createElement("textarea");
  area.value = text;
  area.setAttribute("readonly", "");
  area.className = "visually-hidden";
  document.body.append(area);
  area.select();
  let copied = false;
  try {
    copied = document.execCommand("copy");
  } catch (error) {
    copied = false;
  }
  area.remove();
  return copied;
}

/**
 * Download a transcript with fetch() when an API key is set, because a plain link
 * cannot send the Authorization header.
 */
async function downloadWithKey(link) {
  const response = await fetch(link.href, { headers: authHeaders(), cache: "no-store" });
  if (!response.ok) {
    const { message } = parseErrorBody(await response.text());
    addNotice(message || `The download failed with HTTP ${response.status}.`);
    return;
  }
  const disposition = response.headers.get("Content-Disposition") || "";
  const name = /filename="([^"]+)"/.exec(disposition)?.[1] || `transcript.${link.dataset.format}`;
  const url = URL.createObjectURL(await response.blob());
  const anchor = document.createElement("a");
  anchor.href = url;
  anchor.download = name;
  document.body.append(anchor);
  anchor.click();
  anchor.remove();
  setTimeout(() => URL.revokeObjectURL(url), 0);
}

function acceptFile(file) {
  if (!file) return;
  if (isActive(current)) {
    addNotice(`${file.name} was not started: cancel the current file first, or wait until it is done.`);
    return;
  }
  startRun(file);
}

// ---------------------------------------------------------------------------
// Wiring

ui.fileInput.addEventListener("change", () => {
  const file = ui.fileInput.files[0];
  // Cleared so that picking the same file again still fires "change".
  ui.fileInput.value = "";
  acceptFile(file);
});

ui.anotherFile.addEventListener("click", () => ui.fileInput.click());
ui.retryUpload.addEventListener("click", () => {
  if (current?.file) startRun(current.file, current.options);
});

ui.cancelButton.addEventListener("click", () => cancelRun(current));
ui.resumeButton.addEventListener("click", () => {
  if (!current) return;
  current.resumeAttempts = 0;
  ui.jobError.hidden = true;
  resume(current);
});
ui.copyButton.addEventListener("click", () => copyTranscript(current));
ui.downloads.addEventListener("click", (event) => {
  const link = event.target.closest("a[data-format]");
  if (!link || !ui.apiKeyInput.value.trim()) return;
  event.preventDefault();
  downloadWithKey(link).catch((error) => addNotice(`The download failed: ${error.message}.`));
});

// The key lives in sessionStorage, so it lasts as long as the tab and no longer.
ui.apiKeyInput.value = sessionStorage.getItem(API_KEY_STORAGE) || "";
ui.apiKeyInput.addEventListener("change", () => {
  sessionStorage.setItem(API_KEY_STORAGE, ui.apiKeyInput.value.trim());
});

ui.transcript.addEventListener("click", (event) => {
  const line = event.target.closest(".line");
  if (line) seekToLine(current, line);
});
ui.transcript.addEventListener("keydown", (event) => {
  const line = event.target.closest(".line");
  if (line && moveLineFocus(line, event.key)) event.preventDefault();
});
ui.transcript.addEventListener("focusin", (event) => {
  const line = event.target.closest(".line");
  if (!line) return;
  for (const other of ui.transcript.querySelectorAll('.line[tabindex="0"]')) other.tabIndex = -1;
  line.tabIndex = 0;
});
for (const type of ["wheel", "touchmove", "pointerdown"]) {
  ui.transcriptScroll.addEventListener(type, () => {
    lastManualScroll = Date.now();
  }, { passive: true });
}

window.addEventListener("online", () => {
  if (current && current.phase === "reconnecting") resume(current);
});
window.addEventListener("beforeunload", (event) => {
  if (isActive(current)) event.preventDefault();
});

// Drag and drop anywhere on the page. The depth counter keeps the overlay up while
// the pointer crosses child elements, which fire their own enter and leave events.
let dragDepth = 0;
const carriesFiles = (event) => [...(event.dataTransfer?.types || [])].includes("Files");

document.addEventListener("dragenter", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  dragDepth += 1;
  ui.dropOverlay.hidden = false;
});
document.addEventListener("dragover", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  event.dataTransfer.dropEffect = "copy";
});
document.addEventListener("dragleave", (event) => {
  if (!carriesFiles(event)) return;
  dragDepth = Math.max(0, dragDepth - 1);
  if (dragDepth === 0) ui.dropOverlay.hidden = true;
});
document.addEventListener("drop", (event) => {
  if (!carriesFiles(event)) return;
  event.preventDefault();
  dragDepth = 0;
  ui.dropOverlay.hidden = true;
  acceptFile(event.dataTransfer.files[0]);
});
