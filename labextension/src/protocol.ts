/**
 * The gemma4-nb comm protocol, frontend side: message types, the chat state they build, and the
 * pure helpers the sidebar needs (code blocks, attachments, WAV encoding). No DOM, no JupyterLab:
 * unit-tested with vitest. The kernel side is gemma4_nb/comm.py; docs/panels.md lists every message.
 */

/** The comm target the sidebar opens in the notebook's kernel. */
export const TARGET = 'gemma4_nb.chat';
/** The comm target the extension accepts, for cells the kernel inserts (the widget panel). */
export const FRONTEND_TARGET = 'gemma4_nb.frontend';
/** Run silently before opening the comm: makes the kernel accept it (no %load_ext needed). */
export const BOOTSTRAP =
  'import gemma4_nb.notebook.comm as _gemma4_nb_comm\n_gemma4_nb_comm.register()\ndel _gemma4_nb_comm';

export type AttachmentKind = 'image' | 'audio';

export interface Attachment {
  kind: AttachmentKind;
  name: string;
  mime: string;
  data: string; // base64
}

export interface Usage {
  prompt_tokens: number;
  cached_tokens?: number; // prompt tokens reused from the previous request's cache
  generated_tokens: number;
  tokens_per_s: number;
  prefill_tokens_per_s?: number;
  summary?: string;
}

/** How far a model load is, from the runtime's own count (bytes of a GGUF repacked, tensors read). */
export interface LoadProgress {
  stage: string; // what the runtime is doing, e.g. "repacking gemma-3-270m-q4_k_m.gguf as int4"
  done: number;
  total: number;
  percent: number; // whole; 100 only when the stage is done
}

export interface Status {
  type: 'status';
  state: string; // "not loaded" | "loading" | "ready" | "generating"
  model: string | null; // a readable name: the file or repository, or the server's model
  model_format?: string | null; // e.g. "GGUF Q4_K_M", "safetensors bfloat16", "server"
  device?: string | null; // "cpu", "cuda:0", or the server's address
  conversation?: string; // changes when the kernel forgets the conversation (%gemma reset, a restart)
  memory_mib: number | null;
  tokens_per_s: number | null;
  approval?: string;
  elapsed_s?: number;
  load_seconds?: number;
  progress?: LoadProgress; // while loading, once the runtime reported
}

export type KernelMessage =
  | { type: 'hello'; version: string; protocol: number }
  | Status
  | { type: 'start'; id: string; text: string; attachments: { kind: AttachmentKind; name: string }[] }
  | { type: 'token'; id: string; text: string }
  | { type: 'note' | 'skipped' | 'output'; id: string; text: string }
  | { type: 'code'; id: string; code: string }
  | { type: 'approval'; id: string; approval_id: string; code: string; why: string; ref?: string | null }
  | {
      type: 'done';
      id: string;
      text: string;
      stopped: boolean;
      code_blocks: string[];
      notes?: string[];
      usage: Usage | null;
      context?: string; // one line: what the model saw of the notebook
    }
  | { type: 'error'; id?: string | null; message: string }
  | { type: 'stopping'; id: string | null; running: boolean }
  | { type: 'reset' }
  | { type: 'insert_cell'; code: string; run: boolean; ref?: string }
  | { type: 'run_cell'; ref: string }
  | { type: 'step'; id: string; text: string }
  | { type: 'completion'; id: string; text: string; error?: string };

export type FrontendMessage =
  | { type: 'chat'; id: string; text: string; attachments: Attachment[]; agent: boolean; context: boolean }
  | { type: 'stop' }
  | { type: 'approve'; approval_id: string; ok: boolean }
  | { type: 'status' }
  | { type: 'reset' }
  | { type: 'config'; settings: Record<string, string> }
  | { type: 'complete'; id: string; prefix: string; suffix: string; cells: string[] }
  | { type: 'cell_result'; ref: string; outputs?: unknown[]; status?: string; execution_count?: number | null; missing?: boolean };

export interface Turn {
  id: string;
  role: 'user' | 'assistant' | 'error' | 'note' | 'code' | 'approval' | 'edit';
  text: string;
  attachments?: { kind: AttachmentKind; name: string }[];
  codeBlocks?: string[];
  streaming?: boolean;
  stopped?: boolean;
  usage?: Usage | null;
  context?: string;
  approvalId?: string;
  ref?: string; // an approval: the kernel's name for the agent's cell it would run
  answered?: boolean;
  step?: string; // what the agent is doing now (a reply under way)
  original?: string; // an edit: the cell's source when it was asked for (text: the proposed source)
  outcome?: string; // an edit: what became of it (accepted, rejected, not applied: why)
}

let counter = 0;
export function newId(): string {
  counter += 1;
  return `f${Date.now().toString(36)}${counter}`;
}

/** The chat as the sidebar shows it, built from the kernel's messages. */
export class ChatModel {
  turns: Turn[] = [];
  status: Status | null = null;
  busy = false;
  /** The kernel's conversation the turns belong to (``status.conversation``). */
  conversation: string | null = null;
  /** Called with the cells the kernel asks to insert (the agent's cells; ``ref`` names one to run later). */
  onInsert: ((code: string, run: boolean, ref?: string) => void) | null = null;
  /** Called when the kernel asks to run a cell it inserted (the agent's, approved). */
  onRunCell: ((ref: string) => void) | null = null;
  /** Called with each approval the kernel asks for (the sidebar offers it on the cell too). */
  onApproval: ((t: Turn) => void) | null = null;
  /** Called once an approval is answered (in the panel or on the cell) or its request ended. */
  onApprovalClosed: ((t: Turn) => void) | null = null;

  chat(text: string, attachments: Attachment[], agent = false, context = true): FrontendMessage {
    return { type: 'chat', id: newId(), text, attachments, agent, context };
  }

  private reply(id: string): Turn {
    let t = this.turns.find(x => x.id === id && x.role === 'assistant');
    if (!t) {
      t = { id, role: 'assistant', text: '', streaming: true, codeBlocks: [] };
      this.turns.push(t);
    }
    return t;
  }

  /** A step of a request (a note, the agent's code, a question): above its reply, which stays last. */
  private step(t: Turn): void {
    const reply = this.turns.findIndex(x => x.id === t.id && x.role === 'assistant');
    if (reply >= 0) {
      this.turns.splice(reply, 0, t);
    } else {
      this.turns.push(t);
    }
  }

  /** The user's answer to an approval, from the panel or the cell's toolbar: the message for the
   *  kernel, once; null when it was already answered (the other place's buttons went away). */
  answerApproval(approvalId: string, ok: boolean): FrontendMessage | null {
    const t = this.turns.find(x => x.role === 'approval' && x.approvalId === approvalId);
    if (!t || t.answered) {
      return null;
    }
    t.answered = true;
    t.outcome = ok ? 'approved: it runs in the notebook' : 'skipped: not run';
    this.onApprovalClosed?.(t);
    return { type: 'approve', approval_id: approvalId, ok };
  }

  /** Approvals nobody answered whose request ended (of request ``id``, or all): the kernel no
   *  longer waits for them, so they are offered nowhere. */
  private closeApprovals(id?: string | null): void {
    for (const t of this.turns) {
      if (t.role === 'approval' && !t.answered && (id === undefined || t.id === id)) {
        t.answered = true;
        t.outcome = 'not run: the request ended';
        this.onApprovalClosed?.(t);
      }
    }
  }

  /** Every streaming reply ends where it is (an empty one goes); nothing runs any more. */
  endStreaming(): void {
    this.closeApprovals();
    for (const t of [...this.turns]) {
      if (t.role === 'assistant' && t.streaming) {
        t.streaming = false;
        t.step = undefined;
        if (!t.text) {
          this.turns.splice(this.turns.indexOf(t), 1);
        }
      }
    }
    this.busy = false;
  }

  /** The kernel restarted, died or was replaced: its conversation is gone, and so is the chat. */
  kernelGone(why: string): void {
    this.endStreaming(); // its approvals closed too
    this.turns = this.turns.length && why ? [{ id: newId(), role: 'note', text: why }] : [];
    this.conversation = null;
    this.status = null;
  }

  apply(msg: KernelMessage): void {
    switch (msg.type) {
      case 'hello':
        break;
      case 'status':
        this.status = msg;
        if (msg.conversation !== undefined) {
          if (this.conversation !== null && msg.conversation !== this.conversation && this.turns.length) {
            // the kernel forgot the conversation (%gemma reset): the sidebar shows what it remembers
            this.turns = [{ id: newId(), role: 'note', text: 'the conversation was cleared in the kernel' }];
          }
          this.conversation = msg.conversation;
        }
        if (msg.state !== 'generating' && msg.state !== 'loading' && this.busy) {
          // the kernel runs nothing: a reply whose "done" never came ends here
          this.endStreaming();
        }
        break;
      case 'start':
        this.busy = true;
        this.turns.push({ id: msg.id, role: 'user', text: msg.text, attachments: msg.attachments });
        this.reply(msg.id);
        break;
      case 'token':
        this.reply(msg.id).text += msg.text;
        break;
      case 'note':
      case 'skipped':
      case 'output':
        this.step({ id: msg.id, role: 'note', text: msg.text });
        break;
      case 'code':
        this.step({ id: msg.id, role: 'code', text: msg.code, codeBlocks: [msg.code] });
        break;
      case 'approval': {
        const t: Turn = { id: msg.id, role: 'approval', text: msg.why, approvalId: msg.approval_id };
        if (msg.ref) {
          t.ref = msg.ref;
        }
        this.step(t);
        this.onApproval?.(t);
        break;
      }
      case 'done': {
        const t = this.reply(msg.id);
        t.text = msg.text;
        t.streaming = false;
        t.stopped = msg.stopped;
        t.codeBlocks = msg.code_blocks || [];
        t.usage = msg.usage;
        t.context = msg.context;
        t.step = undefined;
        this.busy = false;
        this.closeApprovals(msg.id);
        break;
      }
      case 'error': {
        // a reply that failed midway stops streaming; a refused request leaves no empty reply
        const t = this.turns.find(x => x.id === msg.id && x.role === 'assistant');
        if (t) {
          this.endStreaming();
        }
        if (msg.id) {
          this.closeApprovals(msg.id);
        }
        this.turns.push({ id: msg.id || newId(), role: 'error', text: msg.message });
        break;
      }
      case 'stopping':
      case 'completion':
        break;
      case 'reset':
        this.closeApprovals();
        this.turns = [];
        break;

      case 'insert_cell':
        if (this.onInsert) {
          this.onInsert(msg.code, msg.run, msg.ref);
        }
        break;
      case 'run_cell':
        if (this.onRunCell) {
          this.onRunCell(msg.ref);
        }
        break;
      case 'step':
        this.reply(msg.id).step = msg.text;
        break;
    }
  }
}

const FENCE = /```(?:python|py)?[ \t]*\n([\s\S]*?)```/g;

/** The fenced code blocks of a reply (same rule as the kernel's). */
export function codeBlocks(text: string): string[] {
  const out: string[] = [];
  for (const m of text.matchAll(FENCE)) {
    const code = m[1].replace(/^\n+|\n+$/g, '');
    if (code.trim()) {
      out.push(code);
    }
  }
  return out;
}

const IMAGE_EXT = ['.png', '.jpg', '.jpeg', '.gif', '.bmp', '.webp', '.tif', '.tiff'];
const AUDIO_EXT = ['.wav', '.flac', '.ogg', '.oga', '.opus', '.mp3', '.aiff', '.aif'];

/** Which attachment a file is, or an error message for the user. */
export function classifyFile(name: string, mime: string): AttachmentKind | { error: string } {
  const ext = name.includes('.') ? name.slice(name.lastIndexOf('.')).toLowerCase() : '';
  const m = (mime || '').toLowerCase();
  if (m.startsWith('image/') || IMAGE_EXT.includes(ext)) {
    return 'image';
  }
  if (m.startsWith('audio/') || AUDIO_EXT.includes(ext)) {
    return 'audio';
  }
  return {
    error: `${name}: unsupported attachment type (${mime || ext || 'unknown'}); attach an image or audio (WAV, FLAC, OGG, MP3)`
  };
}

export function bytesToBase64(bytes: Uint8Array): string {
  let bin = '';
  const chunk = 0x8000;
  for (let i = 0; i < bytes.length; i += chunk) {
    bin += String.fromCharCode(...bytes.subarray(i, i + chunk));
  }
  return btoa(bin);
}

/** Mono at ``target`` Hz from decoded channels (average, then linear interpolation). */
export function downmixResample(channels: Float32Array[], rate: number, target = 16000): Float32Array {
  if (!channels.length || !channels[0].length) {
    return new Float32Array(0);
  }
  const n = channels[0].length;
  const mono = new Float32Array(n);
  for (const ch of channels) {
    for (let i = 0; i < n; i++) {
      mono[i] += ch[i] / channels.length;
    }
  }
  if (rate === target) {
    return mono;
  }
  const outLen = Math.max(1, Math.round((n * target) / rate));
  const out = new Float32Array(outLen);
  const step = rate / target;
  for (let i = 0; i < outLen; i++) {
    const x = i * step;
    const j = Math.min(Math.floor(x), n - 1);
    const k = Math.min(j + 1, n - 1);
    const f = x - j;
    out[i] = mono[j] * (1 - f) + mono[k] * f;
  }
  return out;
}

/** 16-bit PCM WAV bytes (what the kernel's audio loader reads) from float samples in [-1, 1]. */
export function encodeWav(samples: Float32Array, sampleRate = 16000): Uint8Array {
  const buf = new ArrayBuffer(44 + samples.length * 2);
  const v = new DataView(buf);
  const str = (o: number, s: string) => {
    for (let i = 0; i < s.length; i++) {
      v.setUint8(o + i, s.charCodeAt(i));
    }
  };
  str(0, 'RIFF');
  v.setUint32(4, 36 + samples.length * 2, true);
  str(8, 'WAVE');
  str(12, 'fmt ');
  v.setUint32(16, 16, true);
  v.setUint16(20, 1, true); // PCM
  v.setUint16(22, 1, true); // mono
  v.setUint32(24, sampleRate, true);
  v.setUint32(28, sampleRate * 2, true);
  v.setUint16(32, 2, true);
  v.setUint16(34, 16, true);
  str(36, 'data');
  v.setUint32(40, samples.length * 2, true);
  for (let i = 0; i < samples.length; i++) {
    const s = Math.max(-1, Math.min(1, samples[i]));
    v.setInt16(44 + i * 2, s < 0 ? s * 0x8000 : s * 0x7fff, true);
  }
  return new Uint8Array(buf);
}

/** The status line: state, model (name, format, device), load progress, memory, speed. */
export function formatStatus(s: Status | null): string {
  if (!s) {
    return 'connecting…';
  }
  const parts = [s.state];
  if (s.state === 'loading' && s.progress) {
    // the runtime's own count: "repacking gemma-3-270m-q4_k_m.gguf as int4: 42% · 3 s"
    parts.push(`${s.progress.stage}: ${s.progress.percent}%`);
    if (s.elapsed_s !== undefined) {
      parts.push(`${Math.round(s.elapsed_s)} s`);
    }
  } else if (s.state === 'loading' && s.elapsed_s !== undefined) {
    parts.push(`loading the model: ${Math.round(s.elapsed_s)} s`);
  }
  const model = [s.model, s.model_format, s.device].filter(x => x).join(', ');
  if (model) {
    parts.push(model);
  }
  if (s.memory_mib) {
    parts.push(`kernel ${Math.round(s.memory_mib)} MiB`);
  }
  if (s.tokens_per_s) {
    parts.push(`${s.tokens_per_s.toFixed(1)} tokens/s`);
  }
  return parts.join(' · ');
}

/** The line under an answer: what the model saw of the notebook ("" when the kernel said nothing). */
export function formatContext(t: Turn): string {
  return t.context ? `context: ${t.context}` : '';
}

export interface DiffLine {
  op: ' ' | '-' | '+';
  text: string;
}

/** A line diff of a cell's source and a proposed one: the common first and last lines, and a
 *  longest common subsequence of the lines between (a middle too large for that is shown as all
 *  removed, then all added). */
export function lineDiff(before: string, after: string): DiffLine[] {
  const a = before.split('\n');
  const b = after.split('\n');
  let head = 0;
  while (head < a.length && head < b.length && a[head] === b[head]) {
    head++;
  }
  let tail = 0;
  while (tail < a.length - head && tail < b.length - head && a[a.length - 1 - tail] === b[b.length - 1 - tail]) {
    tail++;
  }
  const same = (lines: string[]) => lines.map(text => ({ op: ' ' as const, text }));
  const x = a.slice(head, a.length - tail);
  const y = b.slice(head, b.length - tail);
  return [...same(a.slice(0, head)), ...middleDiff(x, y), ...same(a.slice(a.length - tail))];
}

function middleDiff(a: string[], b: string[]): DiffLine[] {
  if (a.length * b.length > 250000) {
    return [...a.map(text => ({ op: '-' as const, text })), ...b.map(text => ({ op: '+' as const, text }))];
  }
  // lcs[i][j]: the common lines of a[i:] and b[j:]
  const lcs = Array.from({ length: a.length + 1 }, () => new Array<number>(b.length + 1).fill(0));
  for (let i = a.length - 1; i >= 0; i--) {
    for (let j = b.length - 1; j >= 0; j--) {
      lcs[i][j] = a[i] === b[j] ? lcs[i + 1][j + 1] + 1 : Math.max(lcs[i + 1][j], lcs[i][j + 1]);
    }
  }
  const out: DiffLine[] = [];
  let i = 0;
  let j = 0;
  while (i < a.length || j < b.length) {
    if (i < a.length && j < b.length && a[i] === b[j]) {
      out.push({ op: ' ', text: a[i] });
      i++;
      j++;
    } else if (i < a.length && (j === b.length || lcs[i + 1][j] >= lcs[i][j + 1])) {
      out.push({ op: '-', text: a[i] }); // removed lines first, as diffs show them
      i++;
    } else {
      out.push({ op: '+', text: b[j] });
      j++;
    }
  }
  return out;
}

/** The question that asks for a cell edit: the whole new cell, in one code block. */
export function editRequest(instruction: string, source: string, error?: string): string {
  return (
    `${instruction}\n\nReply with the whole new cell in one \`\`\`python code block.\n\n` +
    `\`\`\`python\n${source}\n\`\`\`` +
    (error ? `\n\nThe cell failed with:\n\`\`\`\n${error}\n\`\`\`` : '')
  );
}
