import { describe, expect, it } from 'vitest';

import { runningCells } from './running';

/** A signal as far as runningCells uses one: connect, and (here) emit. */
class Hook<T> {
  private slots: ((sender: unknown, value: T) => void)[] = [];
  connect(slot: (sender: unknown, value: T) => void) {
    this.slots.push(slot);
  }
  emit(value: T) {
    this.slots.forEach(s => s(this, value));
  }
}

/** A kernel connection as far as runningCells reads one: its IOPub messages and status changes. */
class FakeKernel {
  iopubMessage = new Hook<any>();
  statusChanged = new Hook<string>();
  status(state: string, parentType: string, parentId: string) {
    this.iopubMessage.emit({
      header: { msg_type: 'status' },
      parent_header: { msg_type: parentType, msg_id: parentId },
      content: { execution_state: state }
    });
  }
}

describe('runningCells', () => {
  it('counts a cell as running until its own idle, whatever the control channel says', () => {
    const k = new FakeKernel();
    const cells = runningCells(k as any);
    expect(cells.size).toBe(0);
    k.status('busy', 'execute_request', 'cell-1');
    expect(cells.size).toBe(1);
    // a debugger's request or the server's nudge on the control channel: busy, then idle
    k.status('busy', 'debug_request', 'dbg');
    k.status('idle', 'debug_request', 'dbg');
    k.status('idle', 'kernel_info_request', 'info');
    expect([...cells]).toEqual(['cell-1']);
    // a comm message (the sidebar's) is not a cell
    k.status('busy', 'comm_msg', 'comm');
    k.status('idle', 'comm_msg', 'comm');
    expect(cells.size).toBe(1);
    k.status('idle', 'execute_request', 'cell-1');
    expect(cells.size).toBe(0);
  });

  it('is one set per kernel, emptied when the kernel restarts', () => {
    const a = new FakeKernel();
    const b = new FakeKernel();
    a.status('busy', 'execute_request', 'early'); // before anyone watched: not seen
    expect(runningCells(a as any).size).toBe(0);
    runningCells(b as any);
    a.status('busy', 'execute_request', 'x');
    b.status('busy', 'execute_request', 'y');
    b.status('busy', 'execute_request', 'z');
    expect(runningCells(a as any)).toBe(runningCells(a as any));
    expect(runningCells(a as any).size).toBe(1);
    expect(runningCells(b as any).size).toBe(2);
    b.statusChanged.emit('restarting');
    expect(runningCells(b as any).size).toBe(0);
    expect(runningCells(a as any).size).toBe(1);
  });
});
