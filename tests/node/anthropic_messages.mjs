// The `@anthropic-ai/sdk` npm package on the gateway's Messages API
// (POST /v1/messages): `messages.create` and the `messages.stream(...)`
// helper with `finalMessage()`, with tools and thinking; a two-turn tool loop
// with a tool_result (streamed and not); errors as the SDK's own classes.
// stdin: {baseURL, apiKey, model, prompt}; stdout: one JSON object with every
// event and message as the SDK gave them, for the test to check.
import Anthropic from "@anthropic-ai/sdk";

let input = "";
for await (const piece of process.stdin) input += piece;
const { baseURL, apiKey, model, prompt } = JSON.parse(input);
const client = new Anthropic({ baseURL, apiKey, maxRetries: 0, timeout: 30000 });
const tools = [{ name: "lookup", description: "Look it up", input_schema: { type: "object", properties: { text: { type: "string" } } } }];
const thinking = { type: "enabled", budget_tokens: 1024 };
const messages = [{ role: "user", content: prompt }];
const first = { model, max_tokens: 4096, thinking, tools, messages };

const created = await client.messages.create(first);
const helper = client.messages.stream(first);
const events = [];
const seen = { text: "", thinking: "", signature: "", inputJson: "" };
helper.on("thinking", (delta) => { seen.thinking += delta; });
helper.on("inputJson", (delta) => { seen.inputJson += delta; });
for await (const event of helper) events.push(structuredClone(event));
const final = await helper.finalMessage();

const call = final.content.find((block) => block.type === "tool_use");
const result = { type: "tool_result", tool_use_id: call.id, content: [{ type: "text", text: `looked up: ${call.input.text}` }] };
const loop = [...messages, { role: "assistant", content: final.content }, { role: "user", content: [result] }];
const second = await client.messages.create({ model, max_tokens: 4096, thinking, tools, messages: loop });
const secondHelper = client.messages.stream({ model, max_tokens: 4096, tools, messages: loop });
const secondEvents = [];
for await (const event of secondHelper) secondEvents.push(structuredClone(event));
const secondFinal = await secondHelper.finalMessage();

const caught = async (run) => {
  try {
    await run();
    return null;
  } catch (e) {
    const classes = ["NotFoundError", "AuthenticationError", "BadRequestError", "APIError"].filter((name) => e instanceof Anthropic[name]);
    return { classes, status: e.status ?? null, error: e.error ?? null, requestID: e.requestID ?? null };
  }
};
const hi = [{ role: "user", content: "hi" }];
const errors = {
  unknownBackend: await caught(() => client.messages.create({ model: "nowhere/model", max_tokens: 5, messages: hi })),
  unknownBackendStreamed: await caught(() => client.messages.stream({ model: "nowhere/model", max_tokens: 5, messages: hi }).finalMessage()),
  wrongKey: await caught(() => new Anthropic({ baseURL, apiKey: "wrong", maxRetries: 0 }).messages.create({ model, max_tokens: 5, messages: hi })),
  badThinking: await caught(() => client.messages.create({ model, max_tokens: 5, messages: hi, thinking: { type: "enabled" } })),
};
process.stdout.write(JSON.stringify({
  created, helper: { events, final, seen }, second, secondHelper: { events: secondEvents, final: secondFinal }, errors,
}) + "\n");
