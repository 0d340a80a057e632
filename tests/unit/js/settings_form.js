'use strict';
// stdin: {"resources": "...", "cases": [[type, option, value], ...]}
// Runs view/oe/settings.js's load() and render() over the stand-ins and prints what the
// form holds: its sections (class, UCI type, tabs) and every option (class, tab, whether
// it validates), and, for each case, what that option's own validate() says of the value.
const fs = require('fs');
const path = require('path');
const { baseclass, loadClass } = require('./luci_load.js');
const stubs = require('./luci_stubs.js');

const input = JSON.parse(fs.readFileSync(0, 'utf8'));
const res = input.resources;
const schema = loadClass(path.join(res, 'oe', 'schema.js'), { baseclass });
const oev = loadClass(path.join(res, 'oe', 'validate.js'), { baseclass });
const form = stubs.makeForm();
const rpc = stubs.makeRpc({});
const uci = {
	load: () => Promise.resolve(),
	sections: () => [],
	get: () => null
};
const L = stubs.makeL({});
const view = loadClass(path.join(res, 'view', 'oe', 'settings.js'), {
	view: stubs.view, form, rpc, uci, ui: stubs.ui, dom: stubs.dom, poll: stubs.poll,
	'oe.schema': schema, 'oe.validate': oev
}, L);

view.load().then(data => view.render(data)).then(page => {
	const map = form.maps[0];
	const options = {};
	const sections = map.children.map(s => {
		const type = s.cls == 'NamedSection' ? s.args[1] : s.args[0];
		s.options.forEach(o => { options[type + '.' + o.option] = o; });
		return { cls: s.cls, type, name: s.cls == 'NamedSection' ? s.args[0] : null, tabs: s.tabs,
		         hook: s.renderContents().getAttribute('data-oe-section'),
		         options: s.options.map(o => ({ name: o.option, cls: o.cls, tab: o.tab,
		                                       validates: typeof o.validate == 'function',
		                                       rmempty: o.rmempty === undefined ? true : o.rmempty,
		                                       values: o.values })) };
	});
	const cases = (input.cases || []).map(([type, option, value]) => {
		const o = options[type + '.' + option];
		return o ? o.validate('cfg01', value) : 'no option ' + type + '.' + option;
	});
	process.stdout.write(JSON.stringify({
		config: map.config, sections, cases, declared: rpc.declared,
		page: { id: page.attrs.id, writable: page.attrs['data-writable'],
		        reload: page.children[0].attrs }
	}));
}).catch(e => { console.error(e.stack || e); process.exit(1); });
