// A minimal emberd client in JavaScript, written from docs/protocol.md alone:
// DEALER socket, one msgpack header frame (+ raw little-endian int32 frames),
// replies routed by request id. It exists to prove the spec is sufficient.
import { Dealer } from "zeromq";
import { encode, decode } from "@msgpack/msgpack";

export class EmberError extends Error {
  constructor(code, message) {
    super(`${code}: ${message}`);
    this.code = code;
  }
}

export class EmberClient {
  constructor(endpoint) {
    this.sock = new Dealer({ linger: 0 });
    this.sock.connect(endpoint);
    this.nextId = 1;
    this.inbox = new Map(); // id -> { queue: [], wake: null }
    this.reading = this.#readLoop();
  }

  async #readLoop() {
    try {
      for await (const frames of this.sock) {
        const header = decode(frames[0]);
        const arrays = {};
        (header.frames || []).forEach((name, i) => {
          const b = frames[i + 1];
          // copy: the frame's byte offset need not be 4-aligned
          arrays[name] = new Int32Array(new Uint8Array(b).buffer.slice(b.byteOffset, b.byteOffset + b.length));
        });
        const box = this.inbox.get(header.id);
        if (!box) continue;
        box.queue.push({ header, arrays });
        if (box.wake) { const w = box.wake; box.wake = null; w(); }
      }
    } catch (e) {
      if (!this.sock.closed) throw e;
    }
  }

  async send(op, fields = {}, tokens = null) {
    const id = this.nextId++;
    this.inbox.set(id, { queue: [], wake: null });
    const header = { v: 1, op, id, ...fields };
    const frames = [];
    if (tokens) {
      header.frames = ["tokens"];
      frames.push(Buffer.from(new Int32Array(tokens).buffer)); // little-endian on every Node host we run on
    }
    await this.sock.send([encode(header), ...frames]);
    return id;
  }

  async recv(id, timeoutMs = 20000) {
    const box = this.inbox.get(id);
    while (box.queue.length === 0) {
      await new Promise((resolve, reject) => {
        const t = setTimeout(() => reject(new EmberError("timeout", `no reply in ${timeoutMs} ms`)), timeoutMs);
        box.wake = () => { clearTimeout(t); resolve(); };
      });
    }
    return box.queue.shift();
  }

  async call(op, fields = {}, tokens = null) {
    const id = await this.send(op, fields, tokens);
    const { header, arrays } = await this.recv(id);
    this.inbox.delete(id);
    if (header.op === "error") throw new EmberError(header.code, header.message);
    return { header, arrays };
  }

  // Async generator of token events; the `done` event is its return value.
  async *generate(prompt, params = {}) {
    const id = await this.send("generate", { prompt, stream: true, ...params });
    try {
      for (;;) {
        const { header, arrays } = await this.recv(id);
        if (header.op === "token") yield header;
        else if (header.op === "done") { header.tokens = Array.from(arrays.tokens || []); return header; }
        else if (header.op === "error") throw new EmberError(header.code, header.message);
      }
    } finally {
      this.inbox.delete(id);
    }
  }

  close() {
    this.sock.close();
  }
}
