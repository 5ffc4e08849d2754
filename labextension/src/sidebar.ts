/**
 * The sidebar: a chat with the copilot in the active notebook's kernel, over a comm.
 */
import { Clipboard } from '@jupyterlab/apputils';
import { ICodeCellModel } from '@jupyterlab/cells';
import { NotebookActions, NotebookPanel, INotebookTracker } from '@jupyterlab/notebook';
import { IRenderMimeRegistry, MimeModel } from '@jupyterlab/rendermime';
import { IRenderMime } from '@jupyterlab/rendermime-interfaces';
import { Kernel, KernelMessage as JupyterMessage } from '@jupyterlab/services';
import { Toolbar, ToolbarButton } from '@jupyterlab/ui-components';
import { PanelLayout, Widget } from '@lumino/widgets';

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
  editRequest,
  encodeWav,
  lineDiff,
  newId,
  formatContext,
  formatStatus
} from './protocol';

/** A new code cell below the active one (never over a user's cell); run it when asked.
 *  Returns the new cell's model id. */
export async function insertCell(panel: NotebookPanel, code: string, run: boolean): Promise<string | null> {
  const nb = panel.content;
  if (!nb.model) {
    return null;
  }
  NotebookActions.insertBelow(nb);
  NotebookActions.changeCellType(nb, 'code');
  const cell = nb.activeCell;
  if (!cell) {
    return null;
  }
  cell.model.sharedModel.setSource(code);
  if (run) {
    await NotebookActions.run(nb, panel.sessionContext);
  }
  return cell.model.id;
}

/** Run one cell of the notebook with JupyterLab's own action (so the notebook records it: the
 *  execution count, the outputs under it); its outputs once it finished, or null when it is gone. */
export async function runCellById(
  panel: NotebookPanel,
  cellId: string
): Promise<{ outputs: unknown[]; execution_count: number | null } | null> {
  const nb = panel.content;
  const index = nb.widgets.findIndex(c => c.model.id === cellId);
  if (index < 0 || nb.widgets[index].model.type !== 'code') {
    return null;
  }
  nb.activeCellIndex = index;
  nb.deselectAll();
  await NotebookActions.run(nb, panel.sessionContext);
  const model = nb.widgets[index]?.model as ICodeCellModel | undefined;
  if (!model || model.id !== cellId) {
    return null;
  }
  return { outputs: model.outputs.toJSON() as unknown[], execution_count: model.executionCount };
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
  private clearButton = el('button', 'g4-clear jp-mod-styled', 'Clear');
  private history = el('div', 'g4-history');
  private latestButton = el('button', 'g4-latest jp-mod-styled', '↓ latest');
  /** Follow new replies to the bottom; off while the user reads further up. */
  private stickToBottom = true;
  /** What each turn is shown as, kept between renders (a reply's Markdown renders once per change). */
  private views = new Map<Turn, TurnView>();
  private chips = el('div', 'g4-chips');
  private input = el('textarea', 'g4-input');
  private sendButton = el('button', 'g4-send jp-mod-styled jp-mod-accept', 'Send');
  private stopButton = el('button', 'g4-stop jp-mod-styled jp-mod-warn', 'Stop');
  private attachButton = el('button', 'g4-attach jp-mod-styled', 'Attach');
  private recordButton = el('button', 'g4-record jp-mod-styled', 'Record');
  private fileInput = el('input', 'g4-file');
  private agentBox = el('input', 'g4-agent');
  private contextBox = el('input', 'g4-context');

  constructor(
    tracker: INotebookTracker,
    private readonly rendermime: IRenderMimeRegistry
  ) {
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
    this.clearButton.title = 'Clear the chat (the kernel forgets the conversation too)';
    const header = el('div', 'g4-header');
    header.append(this.statusLine, this.clearButton);
    this.latestButton.style.display = 'none';
    const historyBox = el('div', 'g4-history-box');
    historyBox.append(this.history, this.latestButton);
    this.node.append(header, historyBox, this.chips, this.input, buttons, options);
    this.clearButton.onclick = () => this.post({ type: 'reset' });
    this.history.addEventListener('scroll', () => {
      // the user scrolled up to read: new replies do not pull the view down until they come back
      this.stickToBottom = this.history.scrollHeight - this.history.scrollTop - this.history.clientHeight < 24;
      if (this.stickToBottom) {
        this.latestButton.style.display = 'none';
      }
    });
    this.latestButton.onclick = () => {
      this.stickToBottom = true;
      this.history.scrollTop = this.history.scrollHeight;
      this.latestButton.style.display = 'none';
    };

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
    this.model.onInsert = (code, run, ref) => {
      const panel = this.panel;
      if (panel) {
        const inserted = insertCell(panel, code, run)
          .then(id => {
            if (ref && id) {
              this.agentCells.set(ref, { panel, id });
            }
          })
          .catch(() => undefined) // not inserted: the kernel's run_cell finds no cell and says so
          .finally(() => ref && this.insertions.delete(ref));
        if (ref) {
          this.insertions.set(ref, inserted);
        }
      }
    };
    this.model.onRunCell = ref => void this.runAgentCell(ref);
    this.model.onApproval = t => void this.offerOnCell(t);
    this.model.onApprovalClosed = t => {
      this.cellApprovals.get(t.approvalId || '')?.dispose();
      this.cellApprovals.delete(t.approvalId || '');
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
      this.panel.sessionContext.iopubMessage.disconnect(this.onIopub, this);
    }
    this.panel = panel;
    this.disconnectComm();
    if (!panel) {
      this.setStatus('open a notebook to chat with its kernel');
      return;
    }
    panel.sessionContext.kernelChanged.connect(this.onKernelChanged, this);
    panel.sessionContext.statusChanged.connect(this.onKernelStatus, this);
    panel.sessionContext.iopubMessage.connect(this.onIopub, this);
    this.model.kernelGone('');
    this.render();
    await panel.sessionContext.ready;
    if (panel === this.panel) {
      await this.connect();
    }
  }

  private onKernelChanged(): void {
    this.disconnectComm();
    this.model.kernelGone('a new kernel: the conversation starts over');
    this.render();
    void this.connect();
  }

  private onKernelStatus(_: unknown, status: Kernel.Status): void {
    if (status === 'restarting' || status === 'autorestarting' || status === 'dead') {
      this.disconnectComm();
      this.model.kernelGone(
        status === 'dead' ? 'the kernel died: the conversation is gone' : 'the kernel restarted: the conversation starts over'
      );
      this.render();
      this.setStatus(`kernel ${status}`);
    } else if (status === 'idle' && !this.comm && !this.connecting) {
      void this.connect();
    }
  }

  private connecting = false;
  /** Edits asked for, by request id, and the proposals waiting for Accept / Reject. */
  private edits = new Map<string, { panel: NotebookPanel; cellId: string; source: string }>();
  private editTargets = new Map<string, { panel: NotebookPanel; cellId: string; source: string }>();
  /** The agent's cells, by the kernel's name for them: where they are, to run them when approved. */
  private agentCells = new Map<string, { panel: NotebookPanel; id: string }>();
  /** The agent's cells being inserted, by the kernel's name for them (an approval may come first). */
  private insertions = new Map<string, Promise<void>>();
  /** The Run / Skip bars on the agent's cells, by approval id (gone once answered anywhere). */
  private cellApprovals = new Map<string, Toolbar>();

  /** The approval also on the agent's cell itself: a bar at the top of the cell with Run and Skip
   *  (JupyterLab's toolbar widgets). Answering there or in the panel answers both: one message to
   *  the kernel, whose approval protocol decides; the other place's buttons go away. */
  private async offerOnCell(t: Turn): Promise<void> {
    if (!t.ref || !t.approvalId) {
      return;
    }
    await this.insertions.get(t.ref);
    const where = this.agentCells.get(t.ref);
    const cell = where && !where.panel.isDisposed ? where.panel.content.widgets.find(c => c.model.id === where.id) : undefined;
    if (!cell || t.answered || this.cellApprovals.has(t.approvalId)) {
      return; // gone, or answered in the panel meanwhile
    }
    const bar = new Toolbar();
    bar.addClass('g4-cell-approval');
    bar.addItem('question', new Widget({ node: el('span', 'g4-cell-approval-label', `gemma4-nb: run this cell?${t.text ? ` (${t.text})` : ''}`) }));
    bar.addItem('run', new ToolbarButton({
      className: 'g4-cell-run', label: 'Run', tooltip: "Run the agent's cell; the agent reads its output",
      onClick: () => this.answerApproval(t, true)
    }));
    bar.addItem('skip', new ToolbarButton({
      className: 'g4-cell-skip', label: 'Skip', tooltip: 'Do not run it; the cell stays for you to read and run',
      onClick: () => this.answerApproval(t, false)
    }));
    (cell.layout as PanelLayout).insertWidget(0, bar);
    this.cellApprovals.set(t.approvalId, bar);
  }

  /** The agent's approved cell runs in the notebook; its outputs go back to the agent. */
  private async runAgentCell(ref: string): Promise<void> {
    const comm = this.comm;
    const where = this.agentCells.get(ref);
    let result = null;
    try {
      result = where && !where.panel.isDisposed ? await runCellById(where.panel, where.id) : null;
    } catch (err) {
      result = null;
    }
    const reply = result
      ? { type: 'cell_result', ref, outputs: result.outputs, execution_count: result.execution_count }
      : { type: 'cell_result', ref, missing: true };
    if (comm && !comm.isDisposed) {
      comm.send(reply as any);
    }
  }

  /** A cell finished (%gemma unload, model, reset...): ask the kernel for the status it left. */
  private onIopub(_: unknown, msg: JupyterMessage.IMessage): void {
    const parent = msg.parent_header as Partial<JupyterMessage.IHeader>;
    if (
      this.comm &&
      msg.header.msg_type === 'status' &&
      (msg.content as JupyterMessage.IStatusMsg['content']).execution_state === 'idle' &&
      parent.msg_type === 'execute_request'
    ) {
      this.comm.send({ type: 'status' } as any);
    }
  }

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
      comm.open({ run_cells: true }); // the agent's cells run in the notebook, through this sidebar
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
    this.model.endStreaming();
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
    if (msg.type === 'completion') {
      const resolve = this.completions.get(msg.id);
      this.completions.delete(msg.id);
      resolve?.(msg.error ? '' : msg.text);
      return;
    }
    this.model.apply(msg);
    if (msg.type === 'done' || msg.type === 'error') {
      this.proposeEditFrom(msg);
    }
    if (msg.type === 'token') {
      this.scheduleRender(); // many tokens a second: one repaint per frame
    } else {
      this.render();
    }
  }

  /** Completions asked for, by id: answered by the kernel's `completion` message. */
  private completions = new Map<string, (text: string) => void>();

  /** Inline completion at the cursor from the kernel of ``panel`` ("" when it has none, when
   *  this sidebar is not connected to that kernel, or after a few seconds without an answer). */
  complete(panel: NotebookPanel, prefix: string, suffix: string, cells: string[]): Promise<string> {
    const comm = this.comm;
    if (!comm || panel !== this.panel || comm.isDisposed) {
      return Promise.resolve('');
    }
    const id = newId();
    for (const [old, resolve] of this.completions) {
      resolve(''); // superseded: the kernel stops it at its next token
      this.completions.delete(old);
    }
    return new Promise<string>(resolve => {
      this.completions.set(id, resolve);
      comm.send({ type: 'complete', id, prefix, suffix, cells } as any);
      setTimeout(() => {
        if (this.completions.delete(id)) {
          resolve('');
        }
      }, 10000);
    });
  }

  /** Ask a question from a command: shown and sent as if typed. */
  ask(text: string): void {
    this.input.value = text;
    this.send();
  }

  /** Put text in the input box for the user to finish (e.g. the selected code). */
  prefill(text: string): void {
    this.input.value = text;
    this.input.focus();
    this.input.setSelectionRange(text.length, text.length);
  }

  /** Ask for an edit of a cell ("fix this cell", "add a docstring"): the reply's code comes back
   *  as a diff of the cell, applied only when the user accepts it. */
  requestEdit(panel: NotebookPanel, cellId: string, source: string, instruction: string, error?: string): void {
    const msg = this.model.chat(editRequest(instruction, source, error), [], false, this.contextBox.checked);
    if (this.post(msg) && msg.type === 'chat') {
      this.edits.set(msg.id, { panel, cellId, source });
    }
  }

  private proposeEditFrom(msg: KernelMessage): void {
    if ((msg.type !== 'done' && msg.type !== 'error') || !msg.id) {
      return;
    }
    const edit = this.edits.get(msg.id);
    this.edits.delete(msg.id);
    if (!edit || msg.type !== 'done' || msg.stopped) {
      return;
    }
    const proposed = (msg.code_blocks || [])[0];
    if (proposed === undefined) {
      this.model.turns.push({ id: msg.id, role: 'note', text: 'the reply has no code block: nothing to apply to the cell' });
    } else if (proposed.trim() === edit.source.trim()) {
      this.model.turns.push({ id: msg.id, role: 'note', text: 'the proposed cell is the same as the cell: nothing to change' });
    } else {
      this.editTargets.set(msg.id, edit);
      this.model.turns.push({ id: msg.id, role: 'edit', text: proposed, original: edit.source });
    }
  }

  /** Accepted: the cell gets the proposed source in one undoable change (JupyterLab's undo, Ctrl+Z
   *  in the cell, takes it back); never over edits the user made since the proposal. */
  private applyEdit(t: Turn, accept: boolean): void {
    const target = this.editTargets.get(t.id);
    if (!accept) {
      t.outcome = 'rejected: the cell is unchanged';
    } else if (!target || target.panel.isDisposed) {
      t.outcome = 'not applied: the notebook is closed';
    } else {
      const cell = target.panel.content.widgets.find(c => c.model.id === target.cellId);
      if (!cell) {
        t.outcome = 'not applied: the cell is no longer in the notebook';
      } else if (cell.model.sharedModel.getSource() !== target.source) {
        t.outcome = 'not applied: the cell changed since this was proposed (ask again)';
      } else {
        // its own undo step: not merged with the user's typing just before or after
        const undo = (cell.model.sharedModel as { undoManager?: { stopCapturing(): void } | null }).undoManager;
        undo?.stopCapturing();
        cell.model.sharedModel.setSource(t.text);
        undo?.stopCapturing();
        target.panel.content.activeCellIndex = target.panel.content.widgets.indexOf(cell);
        t.outcome = 'applied (Ctrl+Z in the cell undoes it)';
      }
    }
    this.editTargets.delete(t.id);
    this.render();
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

  /** The buttons under a code block: Copy, Insert below, Insert and run (the user's own click). */
  private codeActions(code: string, insert: boolean): HTMLElement {
    const bar = el('div', 'g4-code-actions');
    const copy = el('button', 'g4-copy jp-mod-styled', 'Copy');
    copy.onclick = () => {
      Clipboard.copyToSystem(code);
      copy.textContent = 'Copied';
      setTimeout(() => (copy.textContent = 'Copy'), 1500);
    };
    bar.append(copy);
    if (insert) {
      const below = el('button', 'g4-insert jp-mod-styled', 'Insert below');
      const run = el('button', 'g4-insert-run jp-mod-styled jp-mod-accept', 'Insert and run');
      below.onclick = () => this.panel && void insertCell(this.panel, code, false);
      run.onclick = () => this.panel && void insertCell(this.panel, code, true);
      bar.append(below, run);
    }
    return bar;
  }

  /** A reply's Markdown through JupyterLab's renderer (sanitized: the reply is untrusted; code
   *  highlighted in the theme's colours); once done, each code block gets its buttons. */
  private async renderMarkdown(view: TurnView, t: Turn): Promise<void> {
    const md = t.text + (t.stopped ? '\n\n*(stopped)*' : '');
    const wanted = `${md}\u0000${t.streaming ? 1 : 0}`;
    if (view.rendered === wanted || view.rendering) {
      return;
    }
    view.rendering = true;
    try {
      if (!view.renderer) {
        view.renderer = this.rendermime.createRenderer('text/markdown');
        view.text.replaceChildren(view.renderer.node);
      }
      await view.renderer.renderModel(new MimeModel({ data: { 'text/markdown': md }, trusted: false }));
      view.rendered = wanted;
      if (!t.streaming) {
        view.renderer.node.querySelectorAll('pre').forEach(pre => {
          pre.after(this.codeActions((pre.textContent || '').replace(/\n$/, ''), true));
        });
      }
    } catch (err) {
      view.text.textContent = md; // the text itself rather than nothing
      view.rendered = wanted;
    } finally {
      view.rendering = false;
    }
    this.scrollIfFollowing();
    // the reply moved on while it rendered: render the newest text
    if (`${t.text + (t.stopped ? '\n\n*(stopped)*' : '')}\u0000${t.streaming ? 1 : 0}` !== view.rendered) {
      void this.renderMarkdown(view, t);
    }
  }

  /** Run or Skip, from the panel or the cell's bar: the kernel is told once. */
  private answerApproval(t: Turn, ok: boolean): void {
    const msg = this.model.answerApproval(t.approvalId || '', ok);
    if (msg) {
      this.post(msg);
    }
    this.render();
  }

  /** The turn's box, built again only when what it shows changed (a streaming reply: its text). */
  private viewOf(t: Turn): TurnView {
    const key = JSON.stringify([t.role, t.role === 'assistant' ? '' : t.text, t.streaming, t.stopped, t.answered,
      t.usage, t.context, t.step, t.outcome]);
    let view = this.views.get(t);
    if (view && view.key === key) {
      if (t.role === 'assistant') {
        void this.renderMarkdown(view, t);
      }
      return view;
    }
    const box = el('div', `g4-turn ${t.role === 'code' ? 'g4-code-turn' : `g4-${t.role}`}`);
    box.dataset.id = t.id;
    const text = el('div', 'g4-text');
    view = { key, box, text, renderer: view?.renderer, rendered: undefined, rendering: false };
    if (t.role === 'approval') {
      box.append(el('div', 'g4-label', t.outcome ? `Run the cell above? ${t.outcome}` :
        `Run the cell above? ${t.text ? `(${t.text})` : ''}`));
      if (!t.answered) {
        const run = el('button', 'g4-approve jp-mod-styled jp-mod-accept', 'Run');
        const skip = el('button', 'g4-deny jp-mod-styled', 'Skip');
        run.onclick = () => this.answerApproval(t, true);
        skip.onclick = () => this.answerApproval(t, false);
        box.append(run, skip);
      }
    } else if (t.role === 'edit') {
      box.append(el('div', 'g4-label', 'proposed change to the cell'));
      const diff = el('pre', 'g4-diff');
      for (const line of lineDiff(t.original || '', t.text)) {
        const cls = line.op === '+' ? 'g4-diff-add' : line.op === '-' ? 'g4-diff-del' : 'g4-diff-same';
        diff.append(el('div', cls, `${line.op} ${line.text}`));
      }
      box.append(diff);
      if (t.outcome) {
        box.append(el('div', 'g4-label g4-edit-outcome', t.outcome));
      } else {
        const accept = el('button', 'g4-accept-edit jp-mod-styled jp-mod-accept', 'Accept');
        const reject = el('button', 'g4-reject-edit jp-mod-styled', 'Reject');
        accept.onclick = () => this.applyEdit(t, true);
        reject.onclick = () => this.applyEdit(t, false);
        box.append(accept, reject);
      }
    } else if (t.role === 'code') {
      box.append(el('div', 'g4-label', 'the agent wrote a cell below'), el('pre', 'g4-code', t.text),
        this.codeActions(t.text, false));
    } else if (t.role === 'assistant') {
      if (t.streaming && t.step) {
        box.append(el('div', 'g4-step', `${t.step}…`));
      }
      box.append(text);
      if (view.renderer) {
        text.append(view.renderer.node);
      }
      if (t.streaming) {
        box.classList.add('g4-streaming');
      }
      if (t.usage && !t.streaming) {
        box.append(
          el('div', 'g4-usage', `${t.usage.generated_tokens} tokens · ${t.usage.tokens_per_s.toFixed(1)} tokens/s`)
        );
      }
      if (formatContext(t) && !t.streaming) {
        box.append(el('div', 'g4-context', formatContext(t)));
      }
      void this.renderMarkdown(view, t);
    } else {
      if (t.attachments && t.attachments.length) {
        box.append(el('div', 'g4-attached', t.attachments.map(a => `[${a.kind}: ${a.name}]`).join(' ')));
      }
      text.textContent = t.text;
      box.append(text);
    }
    this.views.set(t, view);
    return view;
  }

  private scrollIfFollowing(): void {
    if (this.stickToBottom) {
      this.history.scrollTop = this.history.scrollHeight;
    } else {
      this.latestButton.style.display = '';
    }
  }

  render(): void {
    if (this.comm) {
      this.setStatus(formatStatus(this.model.status));
    }
    const boxes = this.model.turns.map(t => this.viewOf(t).box);
    for (const t of [...this.views.keys()]) {
      if (!this.model.turns.includes(t)) {
        this.views.get(t)?.renderer?.dispose();
        this.views.delete(t);
      }
    }
    const current = Array.from(this.history.children);
    if (current.length !== boxes.length || boxes.some((b, i) => current[i] !== b)) {
      this.history.replaceChildren(...boxes);
    }
    this.scrollIfFollowing();
    this.sendButton.disabled = this.model.busy;
    this.stopButton.disabled = !this.model.busy;
    this.clearButton.disabled = this.model.busy;
  }
}

/** A turn as shown: its box, and for a reply its Markdown renderer and what it last rendered. */
interface TurnView {
  key: string;
  box: HTMLElement;
  text: HTMLElement;
  renderer?: IRenderMime.IRenderer;
  rendered?: string;
  rendering: boolean;
}
