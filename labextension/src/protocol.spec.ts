import { describe, expect, it } from 'vitest';

import {
  BOOTSTRAP,
  ChatModel,
  TARGET,
  bytesToBase64,
  classifyFile,
  codeBlocks,
  downmixResample,
  editRequest,
  encodeWav,
  lineDiff,
  formatContext,
  formatStatus
} from './protocol';

describe('ChatModel', () => {
  it('builds a streamed reply with its code blocks and speed', () => {
    const m = new ChatModel();
    const msg = m.chat('sum a', [], false, true);
    expect(msg).toMatchObject({ type: 'chat', text: 'sum a', agent: false, context: true });
    const id = (msg as { id: string }).id;
    m.apply({ type: 'start', id, text: 'sum a', attachments: [] });
    expect(m.busy).toBe(true);
    m.apply({ type: 'token', id, text: 'Use ' });
    m.apply({ type: 'token', id, text: '`df.a.sum()`' });
    expect(m.turns.map(t => t.role)).toEqual(['user', 'assistant']);
    expect(m.turns[1]).toMatchObject({ text: 'Use `df.a.sum()`', streaming: true });
    m.apply({
      type: 'done', id, text: 'Use it', stopped: false, code_blocks: ['df.a.sum()'],
      usage: { prompt_tokens: 10, generated_tokens: 3, tokens_per_s: 12.5 }
    });
    expect(m.busy).toBe(false);
    expect(m.turns[1]).toMatchObject({ text: 'Use it', streaming: false, codeBlocks: ['df.a.sum()'] });
    expect(m.turns[1].usage?.tokens_per_s).toBe(12.5);
  });

  it('keeps the line on what the model saw of the notebook', () => {
    const m = new ChatModel();
    m.apply({ type: 'start', id: 'r', text: 'warmest?', attachments: [] });
    expect(formatContext(m.turns[1])).toBe('');
    m.apply({
      type: 'done', id: 'r', text: 'Lima', stopped: false, code_blocks: [],
      usage: { prompt_tokens: 310, cached_tokens: 290, generated_tokens: 2, tokens_per_s: 20 },
      context: 'weather 21x4 · figure "Daily temperature" · 3 cells · last error'
    });
    expect(formatContext(m.turns[1])).toBe('context: weather 21x4 · figure "Daily temperature" · 3 cells · last error');
    expect(m.turns[1].usage?.cached_tokens).toBe(290);
  });

  it('marks a stopped reply and keeps the partial text', () => {
    const m = new ChatModel();
    m.apply({ type: 'start', id: 'r', text: 'long', attachments: [] });
    m.apply({ type: 'token', id: 'r', text: 'Once upon' });
    m.apply({ type: 'done', id: 'r', text: 'Once upon', stopped: true, code_blocks: [], usage: null });
    expect(m.turns[1]).toMatchObject({ text: 'Once upon', stopped: true, streaming: false });
  });

  it('shows errors (busy, bad input) without leaving an empty reply', () => {
    const m = new ChatModel();
    m.apply({ type: 'error', id: 'x', message: 'busy: the model is answering another request' });
    expect(m.turns).toEqual([{ id: 'x', role: 'error', text: 'busy: the model is answering another request' }]);
    m.apply({ type: 'start', id: 'y', text: 'q', attachments: [] });
    m.apply({ type: 'error', id: 'y', message: 'model failed to load' });
    expect(m.turns.map(t => t.role)).toEqual(['error', 'user', 'error']);
    expect(m.busy).toBe(false);
  });

  it('hands the kernel\'s cells to the notebook and records agent steps', () => {
    const m = new ChatModel();
    const inserted: [string, boolean][] = [];
    m.onInsert = (code, run) => inserted.push([code, run]);
    m.apply({ type: 'insert_cell', code: 'x = 1', run: false });
    m.apply({ type: 'code', id: 'r', code: 'result = df' });
    m.apply({ type: 'approval', id: 'r', approval_id: 'a1', code: 'result = df', why: 'it was written by the model' });
    m.apply({ type: 'note', id: 'r', text: '1 image(s) not sent' });
    expect(inserted).toEqual([['x = 1', false]]);
    expect(m.turns.map(t => t.role)).toEqual(['code', 'approval', 'note']);
    expect(m.turns[1]).toMatchObject({ approvalId: 'a1', text: 'it was written by the model' }); // the code: once, above
    // with a reply under way, the steps go above it: the reply stays last
    m.apply({ type: 'start', id: 's', text: 'q', attachments: [] });
    m.apply({ type: 'code', id: 's', code: 'y = 2' });
    expect(m.turns.slice(-3).map(t => t.role)).toEqual(['user', 'code', 'assistant']);
    m.apply({ type: 'reset' });
    expect(m.turns).toEqual([]);
  });

  it('answers an approval once, from the panel or the cell, and offers none after its request ended', () => {
    const m = new ChatModel();
    const offered: string[] = [];
    const closed: string[] = [];
    m.onApproval = t => offered.push(`${t.approvalId}@${t.ref}`);
    m.onApprovalClosed = t => closed.push(`${t.approvalId}: ${t.outcome}`);
    m.apply({ type: 'start', id: 'r', text: 'total per region', attachments: [] });
    m.apply({ type: 'code', id: 'r', code: 'sales.groupby("region").sum()' });
    m.apply({ type: 'approval', id: 'r', approval_id: 'a1', code: 'sales.groupby("region").sum()', why: 'it was written by the model', ref: 'cell7' });
    expect(offered).toEqual(['a1@cell7']);
    expect(m.turns.find(t => t.role === 'approval')).toMatchObject({ approvalId: 'a1', ref: 'cell7' });
    expect(m.turns.find(t => t.role === 'approval')?.answered).toBeFalsy();
    // answered on the cell: one message for the kernel; the panel's later click sends nothing
    expect(m.answerApproval('a1', true)).toEqual({ type: 'approve', approval_id: 'a1', ok: true });
    expect(m.answerApproval('a1', false)).toBeNull();
    expect(m.turns.find(t => t.role === 'approval')).toMatchObject({ answered: true, outcome: 'approved: it runs in the notebook' });
    expect(closed).toEqual(['a1: approved: it runs in the notebook']);
    expect(m.answerApproval('unknown', true)).toBeNull();
    // skipped
    m.apply({ type: 'approval', id: 'r', approval_id: 'a2', code: 'import os; os.remove("x")', why: 'it deletes files' });
    expect(m.answerApproval('a2', false)).toEqual({ type: 'approve', approval_id: 'a2', ok: false });
    expect(closed[1]).toBe('a2: skipped: not run');
    // one nobody answered before the request ended (Stop): closed, its buttons gone everywhere
    m.apply({ type: 'approval', id: 'r', approval_id: 'a3', code: 'x = 1', why: 'it was written by the model', ref: 'cell8' });
    m.apply({ type: 'done', id: 'r', text: '', stopped: true, code_blocks: [], usage: null });
    expect(closed[2]).toBe('a3: not run: the request ended');
    expect(m.answerApproval('a3', true)).toBeNull();
    // ... and when the kernel goes away
    m.apply({ type: 'start', id: 's', text: 'again', attachments: [] });
    m.apply({ type: 'approval', id: 's', approval_id: 'a4', code: 'y = 2', why: 'it was written by the model', ref: 'cell9' });
    m.kernelGone('the kernel restarted: the conversation starts over');
    expect(closed[3]).toBe('a4: not run: the request ended');
    expect(closed).toHaveLength(4);
  });

  it('shows the load percentage the kernel reports', () => {
    const m = new ChatModel();
    m.apply({
      type: 'status', state: 'loading', model: 'gemma-3-270m-q4_k_m.gguf (loads on first use)', memory_mib: 300,
      tokens_per_s: null, elapsed_s: 3.2,
      progress: { stage: 'repacking gemma-3-270m-q4_k_m.gguf as int4', done: 105, total: 250, percent: 42 }
    });
    expect(formatStatus(m.status)).toBe(
      'loading · repacking gemma-3-270m-q4_k_m.gguf as int4: 42% · 3 s · gemma-3-270m-q4_k_m.gguf (loads on first use) · kernel 300 MiB');
  });

  it('keeps the model status', () => {
    const m = new ChatModel();
    m.apply({ type: 'status', state: 'loading', model: null, memory_mib: 300, tokens_per_s: null, elapsed_s: 2.4 });
    expect(formatStatus(m.status)).toBe('loading · loading the model: 2 s · kernel 300 MiB');
    m.apply({
      type: 'status', state: 'ready', model: 'gemma-3-270m-it-Q4_K_M.gguf', model_format: 'GGUF float32',
      device: 'cpu', memory_mib: 512.4, tokens_per_s: 31.25
    });
    expect(formatStatus(m.status)).toBe(
      'ready · gemma-3-270m-it-Q4_K_M.gguf, GGUF float32, cpu · kernel 512 MiB · 31.3 tokens/s');
    m.apply({ type: 'status', state: 'not loaded', model: 'the embedded Gemma 3 270M (loads on first use)',
      model_format: null, device: null, memory_mib: null, tokens_per_s: null });
    expect(formatStatus(m.status)).toBe('not loaded · the embedded Gemma 3 270M (loads on first use)');
    expect(formatStatus(null)).toBe('connecting…');
  });

  it('ends a reply whose done never came once the kernel says it runs nothing', () => {
    const m = new ChatModel();
    m.apply({ type: 'start', id: 'r', text: 'q', attachments: [] });
    m.apply({ type: 'status', state: 'generating', model: 'm', memory_mib: null, tokens_per_s: null });
    expect(m.busy).toBe(true);
    m.apply({ type: 'status', state: 'ready', model: 'm', memory_mib: null, tokens_per_s: null });
    expect(m.busy).toBe(false);
    expect(m.turns.map(t => t.role)).toEqual(['user']); // no empty reply bubble left behind
    m.apply({ type: 'start', id: 's', text: 'q2', attachments: [] });
    m.apply({ type: 'token', id: 's', text: 'partial' });
    m.apply({ type: 'error', id: 's', message: 'RuntimeError: boom' });
    expect(m.turns.slice(-2)).toMatchObject([{ role: 'assistant', text: 'partial', streaming: false }, { role: 'error' }]);
    expect(m.busy).toBe(false);
  });

  it('forgets the chat when the kernel forgets the conversation', () => {
    const m = new ChatModel();
    const status = (conversation: string) =>
      m.apply({ type: 'status', state: 'ready', model: 'm', memory_mib: null, tokens_per_s: null, conversation });
    status('c1');
    m.apply({ type: 'start', id: 'r', text: 'q', attachments: [] });
    m.apply({ type: 'done', id: 'r', text: 'a', stopped: false, code_blocks: [], usage: null });
    status('c1');
    expect(m.turns.map(t => t.role)).toEqual(['user', 'assistant']);
    status('c2'); // %gemma reset in a cell
    expect(m.turns).toMatchObject([{ role: 'note', text: 'the conversation was cleared in the kernel' }]);
    m.apply({ type: 'start', id: 's', text: 'q', attachments: [] });
    m.apply({ type: 'token', id: 's', text: 'half' });
    m.kernelGone('the kernel restarted: the conversation starts over');
    expect(m.turns).toMatchObject([{ role: 'note', text: 'the kernel restarted: the conversation starts over' }]);
    expect(m.busy).toBe(false);
    expect(m.status).toBeNull();
    status('c3'); // the new kernel's conversation: nothing more to clear
    expect(m.turns).toHaveLength(1);
  });
});

describe('cell edits', () => {
  it('diffs a cell line by line', () => {
    const before = 'def f(x):\n    return x+1\n\nf(2)';
    const after = 'def f(x):\n    """One more than x."""\n    return x + 1\n\nf(2)';
    expect(lineDiff(before, after)).toEqual([
      { op: ' ', text: 'def f(x):' },
      { op: '-', text: '    return x+1' },
      { op: '+', text: '    """One more than x."""' },
      { op: '+', text: '    return x + 1' },
      { op: ' ', text: '' },
      { op: ' ', text: 'f(2)' }
    ]);
    expect(lineDiff('a', 'a')).toEqual([{ op: ' ', text: 'a' }]);
    expect(lineDiff('', 'x')).toEqual([{ op: '-', text: '' }, { op: '+', text: 'x' }]);
    // applying the diff's kept and added lines gives the proposal back, whatever the sizes
    const big = Array.from({ length: 600 }, (_, i) => `line ${i}`).join('\n');
    const changed = big.replace('line 300', 'line three hundred');
    const d = lineDiff(big, changed);
    expect(d.filter(l => l.op !== '-').map(l => l.text).join('\n')).toBe(changed);
    expect(d.filter(l => l.op !== '+').map(l => l.text).join('\n')).toBe(big);
    expect(d.filter(l => l.op !== ' ')).toHaveLength(2);
  });

  it('asks for the whole new cell in one block, with the error when there is one', () => {
    const q = editRequest('Fix this cell.', 'x = 1/0', 'ZeroDivisionError: division by zero');
    expect(q).toContain('```python\nx = 1/0\n```');
    expect(q).toContain('ZeroDivisionError: division by zero');
    expect(q.startsWith('Fix this cell.')).toBe(true);
    expect(editRequest('Add a docstring.', 'def f(): pass')).not.toContain('failed');
  });
});

describe('helpers', () => {
  it('finds fenced code blocks like the kernel does', () => {
    expect(codeBlocks('a\n```python\nx = 1\n```\nb\n```\ny\n```\n```py\n\n```')).toEqual(['x = 1', 'y']);
  });

  it('classifies attachments and names the unsupported ones', () => {
    expect(classifyFile('a.png', 'image/png')).toBe('image');
    expect(classifyFile('pasted', 'image/jpeg')).toBe('image');
    expect(classifyFile('voice.wav', '')).toBe('audio');
    expect(classifyFile('rec.webm', 'audio/webm')).toBe('audio');
    expect(classifyFile('notes.txt', 'text/plain')).toEqual({
      error: 'notes.txt: unsupported attachment type (text/plain); attach an image or audio (WAV, FLAC, OGG, MP3)'
    });
  });

  it('encodes 16-bit mono WAV', () => {
    const wav = encodeWav(new Float32Array([0, 1, -1, 0.5]), 16000);
    const v = new DataView(wav.buffer);
    expect(String.fromCharCode(...wav.subarray(0, 4))).toBe('RIFF');
    expect(String.fromCharCode(...wav.subarray(8, 12))).toBe('WAVE');
    expect(v.getUint32(24, true)).toBe(16000);
    expect(v.getUint16(22, true)).toBe(1);
    expect(wav.length).toBe(44 + 8);
    expect([v.getInt16(44, true), v.getInt16(46, true), v.getInt16(48, true)]).toEqual([0, 32767, -32768]);
  });

  it('downmixes and resamples to 16 kHz', () => {
    const left = new Float32Array(48000).fill(0.5);
    const right = new Float32Array(48000).fill(-0.5);
    const out = downmixResample([left, right], 48000, 16000);
    expect(out.length).toBe(16000);
    expect(Math.max(...out.map(Math.abs))).toBeCloseTo(0);
    expect(downmixResample([new Float32Array([0.25, 0.25])], 16000).length).toBe(2);
    expect(downmixResample([], 44100).length).toBe(0);
  });

  it('base64-encodes large buffers', () => {
    const bytes = new Uint8Array(100000).map((_, i) => i % 256);
    expect(Buffer.from(bytesToBase64(bytes), 'base64').equals(Buffer.from(bytes))).toBe(true);
  });

  it('opens the comm the kernel registers', () => {
    expect(TARGET).toBe('gemma4_nb.chat');
    expect(BOOTSTRAP).toContain('_gemma4_nb_comm.register()');
  });
});
