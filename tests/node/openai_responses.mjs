// The `openai` npm package on the gateway's Responses API (POST /v1/responses):
// `responses.create` (not streaming, and with stream: true), the
// `responses.stream(...)` helper with `finalResponse()`, a second turn by
// `previous_response_id` with a `function_call_output`, and an error as the
// SDK's own class. stdin: {baseURL, apiKey, model, prompt}; stdout: one JSON
// object with every event and response as the SDK gave them, for the test to check.
import OpenAI from "openai";

let input = "";
for await (const piece of process.stdin) input += piece;
const { baseURL, apiKey, model, prompt } = JSON.parse(input);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30000 });
const tools = [{ type: "function", name: "lookup", parameters: { type: "object", properties: { text: { type: "string" } } } }];
const first = { model, input: prompt, tools, reasoning: { effort: "low" } };

const created = await client.responses.create(first);
const streamedEvents = [];
for await (const event of await client.responses.create({ ...first, stream: true })) streamedEvents.push(structuredClone(event));
const helper = client.responses.stream(first);
const helperEvents = [];
for await (const event of helper) helperEvents.push(structuredClone(event));
const final = await helper.finalResponse();

const call = final.output.find((item) => item.type === "function_call");
const result = { type: "function_call_output", call_id: call.call_id, output: `looked up: ${JSON.parse(call.arguments).text}` };
const second = await client.responses.create({ model, input: [result], previous_response_id: final.id, tools });
const secondHelper = client.responses.stream({ model, input: [result], previous_response_id: created.id, tools });
const secondEvents = [];
for await (const event of secondHelper) secondEvents.push(structuredClone(event));
const secondStreamed = await secondHelper.finalResponse();

let error = null;
try {
  await client.responses.create({ model: "nowhere/model", input: "hi" });
} catch (e) {
  error = { notFound: e instanceof OpenAI.NotFoundError, apiError: e instanceof OpenAI.APIError, status: e.status, error: e.error ?? null };
}
process.stdout.write(JSON.stringify({
  created: { ...created, output_text: created.output_text },
  streamed: streamedEvents,
  helper: { events: helperEvents, final: { ...final, output_text: final.output_text } },
  second: { ...second, output_text: second.output_text },
  secondHelper: { events: secondEvents, final: { ...secondStreamed, output_text: secondStreamed.output_text } },
  error,
}) + "\n");
