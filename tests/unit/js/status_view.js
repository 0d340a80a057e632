'use strict';
// stdin: {"resources": "...", "status": {...}, "devices": {...}, "access": {"flush": bool,
//         "down": bool}, "viewPermission": bool, "click": [<button selector>...]}
// Runs view/oe/status.js's load() and render() over the stand-ins with those ubus
// replies and prints the page as plain data: every element with an id or data-
// attributes (tag, class, attrs, text), the buttons, the ubus calls made (after
// "clicking" the buttons named in `click`: "flush" or "down:<peer>"), and the polls.
const fs = require('fs');
const path = require('path');
const { loadClass } = require('./luci_load.js');
const stubs = require('./luci_stubs.js');

const input = JSON.parse(fs.readFileSync(0, 'utf8'));
const access = input.access || {};
const rpc = stubs.makeRpc({
	'oe.status': input.status,
	'oe.devices': input.devices,
	'oe.flush': { flushed: 2 },
	'oe.down': { deleted: 1 },
	'session.access': (scope, object, fn) => access[fn] === true
});
const L = stubs.makeL({ viewPermission: input.viewPermission });
const ids = {};
global.document = { getElementById: id => ids[id] || null };
const dom = { content(node, child) { node.children = [ child ]; } };
const view = loadClass(path.join(input.resources, 'view', 'oe', 'status.js'), {
	view: stubs.view, poll: stubs.poll, rpc, ui: stubs.ui, dom
}, L);

function summary(page) {
	const all = [ page ].concat(page.findAll(() => true));
	all.forEach(e => { if (e.id) ids[e.id] = e; });
	return all.filter(e => e.id || Object.keys(e.attrs).some(k => k.startsWith('data-')) ||
	                       e.tagName == 'button')
		.map(e => ({ tag: e.tagName, class: e.className, attrs: e.attrs, text: e.text,
		             handlers: Object.keys(e.handlers), parent: null }));
}

view.load().then(data => view.render(data)).then(async page => {
	const before = summary(page);
	const callsBefore = rpc.calls.length;
	for (const what of input.click || []) {
		const btn = page.find(e => e.tagName == 'button' && (what == 'flush'
			? e.attrs.id == 'oe-flush' : e.attrs['data-peer'] == what.split(':')[1]));
		if (btn && btn.handlers.click)
			await btn.handlers.click({});
	}
	process.stdout.write(JSON.stringify({
		elements: before,
		declared: rpc.declared,
		calls: rpc.calls.slice(callsBefore),
		polls: stubs.poll.added,
		notifications: stubs.ui.notifications.map(n => n.body.text),
		no_footer: view.handleSaveApply === null && view.handleSave === null && view.handleReset === null
	}));
}).catch(e => { console.error(e.stack || e); process.exit(1); });
