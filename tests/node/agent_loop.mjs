// A two-turn tool loop with the `openai` npm package's stream helper, as an
// agent written in Node would run it against the gateway's /v1 route.
// stdin: {baseURL, apiKey, model, prompt}; stdout: one JSON object: what the
// first turn's accumulated message held, and the second turn's answer.
import OpenAI from "openai";

let input = "";
for await (const piece of process.stdin) input += piece;
const { baseURL, apiKey, model, prompt } = JSON.parse(input);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30000 });
const tools = [{ type: "function", function: { name: "lookup", parameters: { type: "object", properties: { text: { type: "string" } } } } }];
const messages = [{ role: "user", content: prompt }];

const first = await client.chat.completions.stream({ model, messages, tools, reasoning_effort: "low" }).finalChatCompletion();
const message = first.choices[0].message;
const call = message.tool_calls[0];
messages.push(message, { role: "tool", tool_call_id: call.id, content: `looked up: ${JSON.parse(call.function.arguments).text}` });
const second = await client.chat.completions.create({ model, messages, tools });
process.stdout.write(JSON.stringify({
  finish: first.choices[0].finish_reason, name: call.function.name, arguments: call.function.arguments,
  reasoning: message.reasoning_content ?? null, answer: second.choices[0].message.content, last: second.choices[0].finish_reason,
}) + "\n");
