/**
 * The sidebar: a chat with the copilot in the active notebook's kernel, over a comm.
 */
import { NotebookActions, NotebookPanel, INotebookTracker } from '@jupyterlab/notebook';
import { Kernel } from '@jupyterlab/services';
import { Widget } from '@lumino/widgets';

import {
  Attachment,
  BOOTSTRAP,
  ChatModel,
  FrontendMessage,
  KernelMessage,
  TARGET,
  Turn,
  bytesToBase64,
  classifyFile,
  downmixResample,
  encodeWav,
  formatContext,
  formatStatus
} from './protocol';

/** A new code cell below the active one (never over a user's cell); run it when asked. */
export async function insertCell(panel: NotebookPanel, code: string, run: boolean): Promise<void> {
  const nb = panel.content;
  if (!nb.model) {
    return;
  }
  NotebookActions.insertBelow(nb);
  NotebookActions.changeCellType(nb, 'code');
  const cell = nb.activeCell;
  if (!cell) {
    return;
  }
  cell.model.sharedModel.setSource(code);
  if (run) {
    await NotebookActions.run(nb, panel.sessionContext);
  }
}

function el<K extends keyof HTMLElementTagNameMap>(
  tag: K,
  cls: string,
  text?: string
): HTMLElementTagNameMap[K] {
  const e = document.createElement(tag);
  e.className = cls;
  if (text !== undefined) {
    e.textContent = text;
  }
  return e;
}

export class ChatSidebar extends Widget {
  readonly model = new ChatModel();
  private panel: NotebookPanel | null = null;
  private comm: Kernel.IComm | null = null;
  private kernel: Kernel.IKernelConnection | null = null;
  private attachments: Attachment[] = [];
  private recorder: MediaRecorder | null = null;
  private renderPending = false;

  private statusLine = el('div', 'g4-status', 'no notebook');
  private history = el('div', 'g4-history');
  private chips = el('div', 'g4-chips');
  private input = el('textarea', 'g4-input');
  private sendButton = el('button', 'g4-send jp-mod-styled jp-mod-accept', 'Send');
  private stopButton = el('button', 'g4-stop jp-mod-styled jp-mod-warn', 'Stop');
  private attachButton = el('button', 'g4-attach jp-mod-styled', 'Attach');
  private recordButton = el('button', 'g4-record jp-mod-styled', 'Record');
  private fileInput = el('input', 'g4-file');
  private agentBox = el('input', 'g4-agent');
  private contextBox = el('input', 'g4-context');

  constructor(tracker: INotebookTracker) {
    super();
    this.id = 'gemma4-nb-sidebar';
    this.addClass('g4-sidebar');
    this.title.caption = 'gemma4-nb chat';
    this.input.placeholder = 'Ask about your notebook (Enter sends, Shift+Enter: new line). Paste or drop images and audio.';
    this.fileInput.type = 'file';
    this.fileInput.multiple = true;
    this.fileInput.accept = 'image/*,audio/*,.wav,.flac,.ogg,.mp3';
    this.fileInput.style.display = 'none';
    this.agentBox.type = 'checkbox';
    this.contextBox.type = 'checkbox';
    this.contextBox.checked = true;
    this.stopButton.disabled = true;

    const options = el('div', 'g4-options');
    const agentLabel = el('label', 'g4-option');
    agentLabel.append(this.agentBox, document.createTextNode(' Agent (writes cells)'));
    const ctxLabel = el('label', 'g4-option');
    ctxLabel.append(this.contextBox, document.createTextNode(' Notebook context'));
    options.append(agentLabel, ctxLabel);
    const buttons = el('div', 'g4-buttons');
    buttons.append(this.sendButton, this.stopButton, this.attachButton, this.recordButton, this.fileInput);
    this.node.append(this.statusLine, this.history, this.chips, this.input, buttons, options);

    this.sendButton.onclick = () => this.send();
    this.stopButton.onclick = () => this.post({ type: 'stop' });
    this.attachButton.onclick = () => this.fileInput.click();
    this.fileInput.onchange = () => {
      void this.addFiles(Array.from(this.fileInput.files || []));
      this.fileInput.value = '';
    };
    this.recordButton.onclick = () => void this.toggleRecording();
    this.input.onkeydown = (e: KeyboardEvent) => {
      if (e.key === 'Enter' && !e.shiftKey) {
        e.preventDefault();
        this.send();
      }
    };
    this.node.addEventListener('paste', (e: ClipboardEvent) => {
      const files = Array.from(e.clipboardData?.files || []);
      if (files.length) {
        e.preventDefault();
        void this.addFiles(files);
      }
    });
    this.node.addEventListener('dragover', (e: DragEvent) => e.preventDefault());
    this.node.addEventListener('drop', (e: DragEvent) => {
      const files = Array.from(e.dataTransfer?.files || []);
      if (files.length) {
        e.preventDefault();
        void this.addFiles(files);
      }
    });
    this.model.onInsert = (code, run) => {
      if (this.panel) {
        void insertCell(this.panel, code, run);
      }
    };
    tracker.currentChanged.connect((_, panel) => void this.follow(panel));
    void this.follow(tracker.currentWidget);
  }

  /** Connect to the kernel of the notebook the user is in. */
  private async follow(panel: NotebookPanel | null): Promise<void> {
    if (panel === this.panel) {
      return;
    }
    if (this.panel) {
      this.panel.sessionContext.kernelChanged.disconnect(this.onKernelChanged, this);
      this.panel.sessionContext.statusChanged.disconnect(this.onKernelStatus, this);
    }
    this.panel = panel;
    this.disconnectComm();
    if (!panel) {
      this.setStatus('open a notebook to chat with its kernel');
      return;
    }
    panel.sessionContext.kernelChanged.connect(this.onKernelChanged, this);
    panel.sessionContext.statusChanged.connect(this.onKernelStatus, this);
    await panel.sessionContext.ready;
    if (panel === this.panel) {
      await this.connect();
    }
  }

  private onKernelChanged(): void {
    this.disconnectComm();
    void this.connect();
  }

  private onKernelStatus(_: unknown, status: Kernel.Status): void {
    if (status === 'restarting' || status === 'dead') {
      this.disconnectComm();
      this.setStatus(`kernel ${status}`);
    } else if (status === 'idle' && !this.comm && !this.connecting) {
      void this.connect();
    }
  }

  private connecting = false;

  private async connect(): Promise<void> {
    const kernel = this.panel?.sessionContext.session?.kernel;
    if (!kernel || this.connecting) {
      return;
    }
    this.connecting = true;
    try {
      this.setStatus('connecting to the kernel…');
      const reply = await kernel.requestExecute({ code: BOOTSTRAP, silent: true, store_history: false }).done;
      if (reply.content.status !== 'ok') {
        const ename = (reply.content as any).ename || 'error';
        this.setStatus(
          ename === 'ModuleNotFoundError'
            ? 'gemma4-nb is not installed in this kernel: pip install gemma4-nb in its environment'
            : `could not start gemma4-nb in this kernel (${ename})`
        );
        return;
      }
      const comm = kernel.createComm(TARGET);
      comm.onMsg = msg => this.receive(msg.content.data as unknown as KernelMessage);
      comm.onClose = () => {
        if (this.comm === comm) {
          this.comm = null;
          this.setStatus('disconnected');
        }
      };
      this.comm = comm;
      this.kernel = kernel;
      comm.open({});
    } catch (err) {
      this.setStatus(`could not connect: ${err}`);
    } finally {
      this.connecting = false;
    }
  }

  private disconnectComm(): void {
    const comm = this.comm;
    this.comm = null;
    this.kernel = null;
    if (comm && !comm.isDisposed) {
      try {
        comm.close();
      } catch {
        // the kernel is gone: nothing to close
      }
    }
    this.model.busy = false;
    this.render();
  }

  private post(msg: FrontendMessage): boolean {
    if (!this.comm || !this.kernel) {
      this.model.apply({ type: 'error', message: 'not connected to a kernel: open a notebook and start its kernel' });
      this.render();
      return false;
    }
    this.comm.send(msg as any);
    return true;
  }

  send(): void {
    const text = this.input.value.trim();
    if (!text && !this.attachments.length) {
      this.model.apply({ type: 'error', message: 'the message is empty: type a question (or attach an image or audio)' });
      this.render();
      return;
    }
    if (this.post(this.model.chat(text, this.attachments, this.agentBox.checked, this.contextBox.checked))) {
      this.input.value = '';
      this.attachments = [];
      this.renderChips();
    }
  }

  private receive(msg: KernelMessage): void {
    this.model.apply(msg);
    if (msg.type === 'token') {
      this.scheduleRender(); // many tokens a second: one repaint per frame
    } else {
      this.render();
    }
  }

  async addFiles(files: File[]): Promise<void> {
    for (const f of files) {
      const kind = classifyFile(f.name || 'pasted', f.type);
      if (typeof kind !== 'string') {
        this.model.apply({ type: 'error', message: kind.error });
        continue;
      }
      const bytes = new Uint8Array(await f.arrayBuffer());
      const name = f.name && f.name !== 'image.png' ? f.name : `pasted-${this.attachments.length + 1}.png`;
      this.attachments.push({ kind, name, mime: f.type, data: bytesToBase64(bytes) });
    }
    this.renderChips();
    this.render();
  }

  /** A voice question: the microphone, recorded until the second click, sent as 16 kHz WAV. */
  async toggleRecording(): Promise<void> {
    if (this.recorder) {
      this.recorder.stop();
      return;
    }
    let stream: MediaStream;
    try {
      stream = await navigator.mediaDevices.getUserMedia({ audio: true });
    } catch (err) {
      this.model.apply({ type: 'error', message: `the microphone is not available: ${err}` });
      this.render();
      return;
    }
    const chunks: Blob[] = [];
    const rec = new MediaRecorder(stream);
    rec.ondataavailable = e => chunks.push(e.data);
    rec.onstop = async () => {
      stream.getTracks().forEach(t => t.stop());
      this.recorder = null;
      this.recordButton.textContent = 'Record';
      this.recordButton.classList.remove('g4-recording');
      try {
        const blob = new Blob(chunks, { type: rec.mimeType });
        const ctx = new AudioContext();
        const decoded = await ctx.decodeAudioData(await blob.arrayBuffer());
        void ctx.close();
        const channels = Array.from({ length: decoded.numberOfChannels }, (_, i) => decoded.getChannelData(i));
        const wav = encodeWav(downmixResample(channels, decoded.sampleRate, 16000), 16000);
        const n = this.attachments.filter(a => a.kind === 'audio').length + 1;
        this.attachments.push({ kind: 'audio', name: `recording-${n}.wav`, mime: 'audio/wav', data: bytesToBase64(wav) });
        this.renderChips();
      } catch (err) {
        this.model.apply({ type: 'error', message: `the recording could not be decoded: ${err}` });
        this.render();
      }
    };
    this.recorder = rec;
    rec.start();
    this.recordButton.textContent = 'Stop recording';
    this.recordButton.classList.add('g4-recording');
  }

  private setStatus(text: string): void {
    this.statusLine.textContent = text;
  }

  private renderChips(): void {
    this.chips.replaceChildren(
      ...this.attachments.map((a, i) => {
        const chip = el('span', `g4-chip g4-chip-${a.kind}`);
        if (a.kind === 'image') {
          const img = el('img', 'g4-thumb');
          img.src = `data:${a.mime || 'image/png'};base64,${a.data}`;
          chip.append(img);
        }
        chip.append(document.createTextNode(`${a.kind === 'audio' ? '🎤 ' : ''}${a.name}`));
        const x = el('button', 'g4-chip-remove', '×');
        x.title = 'remove';
        x.onclick = () => {
          this.attachments.splice(i, 1);
          this.renderChips();
        };
        chip.append(x);
        return chip;
      })
    );
  }

  private scheduleRender(): void {
    if (!this.renderPending) {
      this.renderPending = true;
      requestAnimationFrame(() => {
        this.renderPending = false;
        this.render();
      });
    }
  }

  private renderTurn(t: Turn): HTMLElement {
    const box = el('div', `g4-turn g4-${t.role}`);
    box.dataset.id = t.id;
    if (t.role === 'approval') {
      box.append(el('div', 'g4-label', 'Run this code?'), el('pre', 'g4-code', t.text));
      if (!t.answered) {
        const run = el('button', 'g4-approve jp-mod-styled jp-mod-accept', 'Run');
        const skip = el('button', 'g4-deny jp-mod-styled', 'Skip');
        const answer = (ok: boolean) => {
          t.answered = true;
          this.post({ type: 'approve', approval_id: t.approvalId || '', ok });
          this.render();
        };
        run.onclick = () => answer(true);
        skip.onclick = () => answer(false);
        box.append(run, skip);
      }
      return box;
    }
    if (t.role === 'code') {
      box.append(el('div', 'g4-label', 'the agent wrote a cell'), el('pre', 'g4-code', t.text));
      return box;
    }
    const text = el('div', 'g4-text', t.text + (t.stopped ? '\n\n(stopped)' : ''));
    if (t.attachments && t.attachments.length) {
      box.append(el('div', 'g4-attached', t.attachments.map(a => `[${a.kind}: ${a.name}]`).join(' ')));
    }
    box.append(text);
    if (t.streaming) {
      box.classList.add('g4-streaming');
    }
    for (const code of t.codeBlocks || []) {
      const block = el('div', 'g4-block');
      const insert = el('button', 'g4-insert jp-mod-styled', 'Insert below');
      const run = el('button', 'g4-insert-run jp-mod-styled jp-mod-accept', 'Insert and run');
      insert.onclick = () => this.panel && void insertCell(this.panel, code, false);
      run.onclick = () => this.panel && void insertCell(this.panel, code, true);
      block.append(el('pre', 'g4-code', code), insert, run);
      box.append(block);
    }
    if (t.usage && !t.streaming) {
      box.append(
        el('div', 'g4-usage', `${t.usage.generated_tokens} tokens · ${t.usage.tokens_per_s.toFixed(1)} tokens/s`)
      );
    }
    if (formatContext(t) && !t.streaming) {
      box.append(el('div', 'g4-context', formatContext(t)));
    }
    return box;
  }

  render(): void {
    if (this.comm) {
      this.setStatus(formatStatus(this.model.status));
    }
    const atBottom = this.history.scrollHeight - this.history.scrollTop - this.history.clientHeight < 40;
    this.history.replaceChildren(...this.model.turns.map(t => this.renderTurn(t)));
    if (atBottom) {
      this.history.scrollTop = this.history.scrollHeight;
    }
    this.sendButton.disabled = this.model.busy;
    this.stopButton.disabled = !this.model.busy;
  }
}
