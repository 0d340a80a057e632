'use strict';
// Stand-ins for the parts of LuCI the app's views use (E, _, String.format, form, rpc,
// uci, ui, poll, view), enough to run their load()/render() under node and look at what
// they build: a tree of plain element objects, the form's sections and options, the
// ubus calls declared. Not LuCI: what the browser does with them is the QEMU tier's.
const { baseclass } = require('./luci_load.js');

String.prototype.format = function() {
	const args = Array.from(arguments);
	return this.replace(/%[sdh]/g, () => String(args.shift()));
};
global._ = s => s;

class Elem {
	constructor(tag, attrs, children) {
		this.tagName = tag;
		this.attrs = {};
		this.handlers = {};
		this.children = [];
		this.className = '';
		for (const [k, v] of Object.entries(attrs || {})) {
			if (typeof v == 'function')
				this.handlers[k] = v;
			else if (v != null)
				this.setAttribute(k, v);
		}
		this.append(children);
	}
	append(c) {
		if (c == null)
			return;
		if (Array.isArray(c))
			c.forEach(x => this.append(x));
		else
			this.children.push(c);
	}
	appendChild(c) { this.children.push(c); return c; }
	setAttribute(k, v) {
		if (k == 'class')
			this.className = String(v);
		else
			this.attrs[k] = String(v);
	}
	getAttribute(k) { return k == 'class' ? this.className : (this.attrs[k] ?? null); }
	get id() { return this.attrs.id; }
	get classList() { return { contains: c => this.className.split(/\s+/).includes(c) }; }
	/* every element below, depth first */
	*walk() {
		for (const c of this.children)
			if (c instanceof Elem) {
				yield c;
				yield* c.walk();
			}
	}
	find(pred) { for (const e of this.walk()) if (pred(e)) return e; return null; }
	findAll(pred) { return Array.from(this.walk()).filter(pred); }
	get text() {
		return this.children.map(c => (c instanceof Elem) ? c.text : String(c)).join('');
	}
	querySelector() { return null; }
	querySelectorAll() { return []; }
	toJSON() {
		return { tag: this.tagName, class: this.className, attrs: this.attrs,
		         handlers: Object.keys(this.handlers), text: this.text,
		         children: this.children.filter(c => c instanceof Elem) };
	}
}

global.E = function(tag, attrs, children) {
	if (attrs != null && (typeof attrs != 'object' || Array.isArray(attrs) || attrs instanceof Elem))
		return new Elem(tag, null, attrs);
	return new Elem(tag, attrs, children);
};

/* LuCI's view class: the file's object over a base with the default handlers */
const view = {
	extend(props) {
		return baseclass.extend(Object.assign({
			handleSave: function() { return Promise.resolve(); },
			handleSaveApply: function() { return Promise.resolve(); },
			handleReset: function() { return Promise.resolve(); }
		}, props));
	}
};

function makeRpc(replies) {
	const declared = [];
	return {
		declared,
		calls: [],
		declare(opts) {
			declared.push({ object: opts.object, method: opts.method, params: opts.params || [] });
			const self = this;
			return function() {
				const args = Array.from(arguments);
				self.calls.push({ object: opts.object, method: opts.method, args });
				const key = opts.object + '.' + opts.method;
				let r = replies[key];
				if (typeof r == 'function')
					r = r(...args);
				return Promise.resolve(r === undefined ? {} : r);
			};
		}
	};
}

/* form: records sections (class, args, tabs) and their options (class, name, tab) */
function makeForm() {
	const sections = [];
	class Option {
		constructor(cls, name, title, tab) {
			this.cls = cls;
			this.option = name;
			this.title = title;
			this.tab = tab;
			this.values = [];
		}
		value(v) { this.values.push(v); }
	}
	class Section {
		constructor(cls, args) {
			this.cls = cls;
			this.args = args;
			this.options = [];
			this.tabs = [];
		}
		tab(id, title) { this.tabs.push(id); }
		renderContents() { return new Elem('div', { 'class': 'cbi-section' }); }
		option(cls, name, title) {
			const o = new Option(cls.name, name, title, null);
			this.options.push(o);
			return o;
		}
		taboption(tab, cls, name, title) {
			const o = new Option(cls.name, name, title, tab);
			this.options.push(o);
			return o;
		}
	}
	class Map {
		constructor(config, title, descr) {
			this.config = config;
			this.children = [];
			sections.push(this);
		}
		section(cls, ...args) {
			const s = new Section(cls.name, args);
			this.children.push(s);
			return s;
		}
		render() { return Promise.resolve(new Elem('div', { 'class': 'cbi-map' })); }
	}
	const named = n => ({ [n]: function() {} })[n];
	return {
		maps: sections,
		Map,
		NamedSection: named('NamedSection'),
		TypedSection: named('TypedSection'),
		Flag: named('Flag'),
		Value: named('Value'),
		ListValue: named('ListValue'),
		DynamicList: named('DynamicList')
	};
}

function makeL(env) {
	return {
		bind: (fn, ctx, ...a) => fn.bind(ctx, ...a),
		resolveDefault: (p, d) => Promise.resolve(p).catch(() => d),
		hasViewPermission: () => (env.viewPermission === undefined ? true : env.viewPermission)
	};
}

const ui = {
	notifications: [],
	addNotification(title, body, kind) { this.notifications.push({ title, body, kind }); },
	createHandlerFn(ctx, fn, ...args) {
		const f = (typeof fn == 'string') ? ctx[fn] : fn;
		return ev => f.apply(ctx, [...args, ev]);
	},
	changes: { apply() {} }
};

const poll = { added: [], add(fn, interval) { this.added.push(interval); } };
const dom = { content() {} };

module.exports = { Elem, view, makeRpc, makeForm, makeL, ui, poll, dom };
