// The differential SSE oracle: npm eventsource-parser@3 (spec-faithful; 3.x
// declares Node >= 18, which Debian 12 ships).
// stdin: one JSON string per line, the base64 of one complete byte stream.
// stdout: one JSON array per line, the events [{event, data, id}] it holds.
// Ids persist across events, as in browsers (3.x reports an id with its event); the
// decoder keeps a BOM so the parser strips exactly one.
import { createParser } from "eventsource-parser";
import { createInterface } from "node:readline";

const lines = createInterface({ input: process.stdin, crlfDelay: Infinity });
for await (const line of lines) {
  if (!line) continue;
  const bytes = Buffer.from(JSON.parse(line), "base64");
  const events = [];
  let lastId = "";
  const parser = createParser({
    onEvent: (e) => {
      if (e.id !== undefined) lastId = e.id;
      events.push({ event: e.event ?? "message", data: e.data, id: lastId });
    },
  });
  parser.feed(new TextDecoder("utf-8", { ignoreBOM: true }).decode(bytes));
  process.stdout.write(JSON.stringify(events) + "\n");
}
