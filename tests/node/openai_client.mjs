// The `openai` npm package used as a Node program would use it, against the
// gateway's OpenAI-compatible route. stdin: one JSON object {baseURL, apiKey,
// cases: [{request, helper}]}; stdout: one JSON line per case: what the SDK
// returned (text, chunk facts) or threw (its class, status, message, param, code).
import OpenAI from "openai";

let input = "";
for await (const piece of process.stdin) input += piece;
const { baseURL, apiKey, cases } = JSON.parse(input);
const client = new OpenAI({ baseURL, apiKey, maxRetries: 0, timeout: 30000 });

async function run({ request, helper }) {
  const out = { text: "" };
  try {
    if (helper) {
      const stream = client.chat.completions.stream(request);
      for await (const chunk of stream) out.text += chunk.choices[0]?.delta?.content ?? "";
      const final = await stream.finalChatCompletion();
      out.finalText = final.choices[0].message.content;
      out.finish = final.choices[0].finish_reason;
    } else if (request.stream) {
      const ids = new Set();
      out.roles = [];
      for await (const chunk of await client.chat.completions.create(request)) {
        ids.add(chunk.id);
        if (chunk.usage) out.usage = chunk.usage;
        const choice = chunk.choices[0];
        if (!choice) continue;
        if (choice.delta.role) out.roles.push(choice.delta.role);
        out.text += choice.delta.content ?? "";
        if (choice.finish_reason) out.finish = choice.finish_reason;
      }
      out.ids = ids.size;
    } else {
      const completion = await client.chat.completions.create(request);
      out.object = completion.object;
      out.text = completion.choices[0].message.content;
      out.finish = completion.choices[0].finish_reason;
      out.usage = completion.usage;
    }
  } catch (error) {
    out.error = {
      class: error.constructor.name, status: error.status ?? null, message: error.message,
      param: error.param ?? null, code: error.code ?? null,
    };
  }
  return out;
}

for (const c of cases) process.stdout.write(JSON.stringify(await run(c)) + "\n");
