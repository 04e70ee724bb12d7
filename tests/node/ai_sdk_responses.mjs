// Three turns with a tool call through the AI SDK's default OpenAI provider
// (`openai(model)`: the Responses API, `store` true), as an app built on the
// AI SDK runs them against the gateway: turn 1 calls the tool, turn 2 sends
// the result and gets the answer, turn 3 continues the conversation. From
// turn 2 on the SDK sends earlier output as `item_reference`s by id.
// stdin: {baseURL, apiKey, model, prompt}; stdout: one JSON object: each
// step's text, tool calls and finish reason, and the input items each request sent.
import { createOpenAI } from "@ai-sdk/openai";
import { generateText, jsonSchema, stepCountIs, tool } from "ai";

let input = "";
for await (const piece of process.stdin) input += piece;
const { baseURL, apiKey, model, prompt } = JSON.parse(input);
const sent = [];
const fetchAndNote = async (url, init) => {
  sent.push(JSON.parse(init.body).input);
  return fetch(url, init);
};
const openai = createOpenAI({ baseURL, apiKey, fetch: fetchAndNote });
const tools = {
  lookup: tool({
    inputSchema: jsonSchema({ type: "object", properties: { text: { type: "string" } } }),
    execute: async ({ text }) => `looked up: ${text}`,
  }),
};
const first = await generateText({ model: openai(model), prompt, tools, stopWhen: stepCountIs(2), maxRetries: 0 });
const third = await generateText({
  model: openai(model), maxRetries: 0,
  messages: [{ role: "user", content: prompt }, ...first.response.messages, { role: "user", content: "and once more" }],
});
const steps = [...first.steps, ...third.steps].map((step) => ({
  text: step.text, finish: step.finishReason,
  calls: step.toolCalls.map((call) => ({ name: call.toolName, input: call.input })),
  usage: { input: step.usage.inputTokens, output: step.usage.outputTokens },
}));
process.stdout.write(JSON.stringify({ steps, sent }) + "\n");
