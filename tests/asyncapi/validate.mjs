// Parses each AsyncAPI document named on the command line with
// @asyncapi/parser and prints one JSON line per document:
// {"file", "parsed", "diagnostics": [{"severity", "code", "message", "path"}]}
// severity as the parser gives it: 0 error, 1 warning, 2 information, 3 hint.
// Exits 0 once every document is read; the caller judges the diagnostics.
import { readFile } from 'node:fs/promises';
import { Parser } from '@asyncapi/parser';

const parser = new Parser();
for (const file of process.argv.slice(2)) {
  const text = await readFile(file, 'utf8');
  const { document, diagnostics } = await parser.parse(text, { source: file });
  console.log(JSON.stringify({
    file,
    parsed: document !== undefined,
    diagnostics: diagnostics.map((d) => ({
      severity: d.severity,
      code: String(d.code),
      message: d.message,
      path: d.path.join('/'),
    })),
  }));
}
