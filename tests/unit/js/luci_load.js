'use strict';
// Loads a LuCI class file (htdocs/luci-static/resources/...) under node the way
// luci.js's require() does: the file's body becomes a function of (window, document, L,
// <its 'require' names>), and what it returns is instantiated. The caller gives the
// required classes (stand-ins for LuCI's own, or other files loaded the same way).
const fs = require('fs');

const REQUIRE = /^\s*'require\s+(\S+)(?:\s+as\s+([A-Za-z_]\S*))?';/gm;

function requires(source) {
	const out = [];
	let m;
	while ((m = REQUIRE.exec(source)) !== null)
		out.push({ name: m[1], as: m[2] || m[1].replace(/[^a-zA-Z0-9_]/g, '_') });
	return out;
}

/* baseclass.extend as LuCI's: a constructor whose prototype holds the properties */
const baseclass = {
	extend(props) {
		function Class() {
			if (typeof this.__init__ == 'function')
				this.__init__.apply(this, arguments);
		}
		Object.assign(Class.prototype, props);
		Class.extend = function(more) {
			const Sub = baseclass.extend(Object.assign({}, props, more));
			return Sub;
		};
		return Class;
	}
};

function loadClass(path, deps, L) {
	const source = fs.readFileSync(path, 'utf8');
	const reqs = requires(source);
	const names = reqs.map(r => r.as);
	const values = reqs.map(r => {
		if (!(r.name in deps))
			throw new Error(path + ' requires ' + r.name + ', which the harness does not give');
		return deps[r.name];
	});
	const factory = new Function('window', 'document', 'L', ...names, source);
	const Class = factory(globalThis.window, globalThis.document, L || {}, ...values);
	return new Class();
}

module.exports = { baseclass, loadClass, requires };
