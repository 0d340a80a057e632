'use strict';
// stdin: {"resources": "<htdocs/luci-static/resources>", "cases": [[type, option, value], ...]}
// stdout: one result per case, [ok, value or error], from oe/validate.js against the
// generated oe/schema.js (tests/unit/test_luci_app.py compares them with Python's).
const fs = require('fs');
const path = require('path');
const { baseclass, loadClass } = require('./luci_load.js');

const input = JSON.parse(fs.readFileSync(0, 'utf8'));
const res = input.resources;
const schema = loadClass(path.join(res, 'oe', 'schema.js'), { baseclass });
const oev = loadClass(path.join(res, 'oe', 'validate.js'), { baseclass });
const doc = schema.doc;
const rows = {};
doc.sections.forEach(s => s.options.forEach(o => { rows[s.type + '.' + o.name] = o; }));
const out = input.cases.map(([type, option, value]) => {
	const row = rows[type + '.' + option];
	if (!row)
		return [false, 'no schema row ' + type + '.' + option];
	const r = oev.check(doc, row, value);
	return r.ok ? [true, r.value] : [false, r.error];
});
process.stdout.write(JSON.stringify(out));
