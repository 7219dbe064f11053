// Usage: node stream.mjs ENDPOINT PROMPT MAX_TOKENS
// Prints one JSON line per event with its arrival time: hello, each token, done,
// then the replies to a tokenize, a bad request and a ping.
import { EmberClient, EmberError } from "./ember_client.mjs";

const [endpoint, prompt, maxTokens] = process.argv.slice(2);
const client = new EmberClient(endpoint);
const now = () => Number(process.hrtime.bigint()) / 1e6;
const out = (obj) => process.stdout.write(JSON.stringify({ t_ms: now(), ...obj }) + "\n");

try {
  const hello = (await client.call("hello", { versions: [1] })).header;
  out({ event: "hello", version: hello.version, model: hello.model });

  const gen = client.generate(prompt, { max_tokens: Number(maxTokens), temperature: 0 });
  let step;
  while (!(step = await gen.next()).done) out({ event: "token", i: step.value.i, text: step.value.text });
  const done = step.value;
  out({ event: "done", stop: done.stop, text: done.text, tokens: done.tokens, usage: done.usage });

  const tok = await client.call("tokenize", { text: prompt });
  out({ event: "tokenize", ids: Array.from(tok.arrays.tokens) });
  const det = await client.call("detokenize", {}, Array.from(tok.arrays.tokens));
  out({ event: "detokenize", text: det.header.text });

  try {
    await client.call("generate", { prompt, temperature: -1 });
  } catch (e) {
    out({ event: "error", code: e instanceof EmberError ? e.code : String(e) });
  }
  await client.call("ping");
  out({ event: "ping" });
} finally {
  client.close();
}
